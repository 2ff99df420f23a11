"""The Markdown report names the calibration data a run used."""

from torchcompress.recipe.report_md import render_markdown
from torchcompress.recipe.runner import Report


def test_report_names_calibration_data():
    rep = Report(recipe="w4-gptq-g128", size_bytes_before=10, size_bytes_after=5)
    rep.extra["calibration"] = {"sources": [{"source": "self", "description": "sampled from the model", "samples": 4,
                                             "weight": 1.0}], "samples": 4, "seq_len": 16, "tokens": 64,
                                "sha256": "ab" * 32}
    md = render_markdown(rep, has_sqnr_plot=False)
    assert "Calibration data: 4 x 16 (64 tokens) from sampled from the model (4 samples); sha256 abababab" in md
