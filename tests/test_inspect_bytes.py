"""`compress inspect` counts each tensor at the dtype its file holds, not at config.json's dtype."""
import json

import torch

from compress.checkpoint import weight_files
from compress.checkpoint_validation import check_weight_files, header_nbytes
from compress.cli_inspect import inspect_checkpoint


def header_total(folder) -> int:
    return sum(header_nbytes(*info) for info in check_weight_files(folder, weight_files(folder)).values())


def inspected(folder) -> tuple[int, dict]:
    result = inspect_checkpoint(str(folder), "auto", "cpu")
    return sum(v["dense"] + v["compressed"] for v in result["components"].values()), result["budget"]


def test_config_dtype_that_the_file_does_not_hold(tmp_path, tiny_model):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = "float32"  # a folder whose config says float32 over bf16 weights (was counted twice its size)
    (tmp_path / "config.json").write_text(json.dumps(config))
    stored, budget = inspected(tmp_path)
    assert stored == header_total(tmp_path)
    assert budget["weights_total"] == {"original": stored, "stored": stored}  # a dense folder: nothing saved


def test_mixed_dtypes_in_one_file(tmp_path, tiny_model):
    model = tiny_model("llama").to(torch.bfloat16)
    model.lm_head.to(torch.float32)  # a head kept float32 beside bf16 layers (was counted at bf16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    stored, budget = inspected(tmp_path)
    assert stored == header_total(tmp_path)
    assert budget["weights"]["head"]["stored"] == budget["weights"]["head"]["original"] == 128 * 64 * 4
    assert budget["weights_total"] == {"original": stored, "stored": stored}
