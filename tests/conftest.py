import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct, float32 on CPU, loaded once."""
    from onpolicy_sft.models import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model and tokenizer saved as a checkpoint directory, for code that loads by path."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(tiny_tokenizer, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def lock_holder():
    """``hold(directory, stage)``: another process holding the directory's run lock (a process
    shares a lock it holds itself, so a refusal needs another one); it is killed at the end."""
    import subprocess

    code = ("import sys, time; from onpolicy_sft.rundir import RunLock\nwith RunLock(sys.argv[1], sys.argv[2]):\n"
            "    print('held', flush=True); time.sleep(120)")
    procs = []

    def hold(directory, stage="run"):
        proc = subprocess.Popen([sys.executable, "-c", code, str(directory), stage], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
