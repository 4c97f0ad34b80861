"""The project's own Kedro datasets."""

from __future__ import annotations

from best_minibatch.kedro_glue.datasets import OptionalDataset


def test_optional_dataset_reads_none_until_saved_then_the_newest_version(tmp_path):
    config = {"type": "text.TextDataset", "filepath": str(tmp_path / "fragment.html"), "versioned": True}
    section = OptionalDataset(dataset=config)
    assert not section.exists() and section.load() is None
    OptionalDataset(dataset=config).save("<section>first</section>")
    OptionalDataset(dataset=config).save("<section>second</section>")
    assert len(list((tmp_path / "fragment.html").iterdir())) == 2  # versions are kept
    assert OptionalDataset(dataset=config).load() == "<section>second</section>"
