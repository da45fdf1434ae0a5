"""The langchain-tests standard suites for MMEmbedEmbeddings, run on the session's tiny checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_tests", reason='needs the dev extra: pip install "mmembed-rag[dev]"')

from langchain_tests.integration_tests import EmbeddingsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from mmembed_rag.integrations.langchain import MMEmbedEmbeddings  # noqa: E402

pytestmark = pytest.mark.both_families  # every test runs once per model family


@pytest.fixture(scope="class", autouse=True)
def _checkpoint_on_class(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> None:
    # The standard suites read constructor arguments from a property, not a fixture: hand the path over here.
    request.cls.checkpoint = tiny_checkpoint


class _TinyCheckpointParams:
    checkpoint: Path

    @property
    def embeddings_class(self) -> type[MMEmbedEmbeddings]:
        return MMEmbedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": str(self.checkpoint)}


class TestMMEmbedEmbeddingsUnit(_TinyCheckpointParams, EmbeddingsUnitTests):
    pass


# pytest-asyncio runs in strict mode here (no asyncio_mode="auto" in pyproject), so the suite's async tests need
# the mark; a class mark also lands on its sync tests, whose "not an async function" warning is expected.
@pytest.mark.filterwarnings("ignore:The test <Function test_.*not an async function:pytest.PytestWarning")
@pytest.mark.asyncio
class TestMMEmbedEmbeddingsIntegration(_TinyCheckpointParams, EmbeddingsIntegrationTests):
    pass
