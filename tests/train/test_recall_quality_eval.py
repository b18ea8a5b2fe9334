"""mka eval recall-quality on a text model trained by mka train: per-layer captured shares of
the three selectors, the oracle on top, JSON written; task checkpoints and bad lengths refused."""

import json

from mka.cli import main as mka_main
from mka.train import main as train_main


def test_recall_quality_of_a_text_model(corpus_file, run_args, tmp_path, capsys):
    assert train_main(run_args(corpus_file, "--attention", "gqa", "--num-kv-heads", "2",
                               "--max-steps", "3", "--seq-len", "128")) == 0
    out = tmp_path / "quality.json"
    rc = mka_main(["eval", "recall-quality", str(tmp_path / "out" / "gqa"), "--chunk", "8",
                   "--window", "16", "--budgets", "0.0625,0.25", "--cache-dir",
                   str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mean  oracle" in printed and "captured share" in printed
    r = json.loads(out.read_text())
    assert len(r["per_layer"]) == 2 and r["length"] == 128
    for layer in r["per_layer"] + [r["mean"]]:
        for f in ("0.0625", "0.25"):
            assert 0 < layer["simhash"][f] <= layer["oracle"][f] + 1e-9 <= 1 + 1e-9
            assert layer["quest"][f] <= layer["oracle"][f] + 1e-9
            assert layer["corners"][f] <= layer["oracle"][f] + 1e-9
    assert mka_main(["eval", "recall-quality", str(tmp_path / "out" / "gqa"), "--length", "999",
                     "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "exceeds the block size 128" in capsys.readouterr().err
