"""Run as a script, in a process that never imports compress: load each folder with plain
`AutoModelForCausalLM.from_pretrained` (as a user of transformers or vLLM would) and write its logits on fixed
token ids, or the error it raised. Usage: python plain_transformers.py JOBS.json (a list of
{"folder", "out", "dequantize"}); writes OUT.safetensors (key "logits") or OUT.error.txt."""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main(jobs_file: str) -> None:
    ids = torch.arange(3, 67).remainder(8000).unsqueeze(0)
    for job in json.loads(open(jobs_file).read()):
        kwargs = {}
        if job.get("dequantize"):
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32, **kwargs)
        except Exception as exc:  # the refusal is the result for native checkpoints
            open(job["out"] + ".error.txt", "w").write(f"{type(exc).__name__}: {exc}")
            continue
        with torch.no_grad():
            logits = model(ids).logits[0].contiguous()
        save_file({"logits": logits}, job["out"] + ".safetensors")
    assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules), "compress was imported"


if __name__ == "__main__":
    main(sys.argv[1])
