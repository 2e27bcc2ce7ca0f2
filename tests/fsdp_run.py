"""One training run of the FSDP tests, in this process or as one of torchrun's processes.

    fsdp_run.py OUT_DIR OBJECTIVE FSDP(0|1) [KILL_AFTER_STEP [LONG(0|1)]]

LONG=1 turns on packing (of 2-row micro-batches) and gradient checkpointing, which must not change the result.

After the first step each process writes ``sharded_<rank>.json``: whether its model's parameters
were FSDP shards (DTensors) while it trained.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from onpolicy_sft.config import ObjectiveConfig, TrainConfig  # noqa: E402
from onpolicy_sft.fsdp import is_sharded  # noqa: E402
from onpolicy_sft.rundir import write_json  # noqa: E402
from onpolicy_sft.train import train  # noqa: E402
from tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402


def rows(objective: str, n: int = 16):
    import datasets

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        a, b = torch.randint(1, 99, (2,), generator=g).tolist()
        pad = "x" * int(torch.randint(0, 9, (1,), generator=g))
        if objective == "dpo":
            out.append({"prompt": f"add {a} and {b}", "chosen": f"{a}+{b}={a + b}{pad}", "rejected": f"{a - b}?"})
        else:
            out.append({"prompt": f"add {a} and {b}" + "!" * (i % 3), "response": f"{a}+{b}={pad} {a + b}"})
    return datasets.Dataset.from_list(out)


def run(out_dir: str, objective: str, fsdp: bool, kill_after: int = 0, long: bool = False) -> None:
    torch.set_num_threads(1)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=0, dtype=torch.float64)
    config = TrainConfig(objective=ObjectiveConfig(name=objective), lr=1e-2, batch_size=4, micro_batch_size=1 + long,
                         warmup_ratio=0.2, max_grad_norm=1.0, save_every=2, trackers=["jsonl"], progress=False,
                         mixed_precision="no", fsdp=fsdp, packing=long, gradient_checkpointing=long)

    def on_step(done: int) -> None:
        if done == 1:
            write_json(Path(out_dir) / f"sharded_{os.environ.get('RANK', '0')}.json", {"sharded": is_sharded(model)})
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train(model, tokenizer, rows(objective), config, out_dir=out_dir, on_step=on_step)


if __name__ == "__main__":
    args = sys.argv[1:] + ["0", "0"][len(sys.argv) - 4 :]
    run(args[0], args[1], args[2] == "1", int(args[3]), args[4] == "1")
