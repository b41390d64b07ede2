"""Data-parallel training on the engines users run, 2 CPU processes (gloo): DistributedDataParallel, FSDP2
(``fully_shard``), transformers' Trainer under torchrun and an Accelerator loop under ``accelerate launch``. For
both schedules (full BPTT and ``checkpoint_segments=True``), a decoder and an encoder-classifier: after 3 SGD steps
on a batch split over the ranks, the parameters (and the first step's gradients) equal one process running the
whole batch. The runs are python_tests/data_parallel.py; each launcher starts once per module."""
import os
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "data_parallel.py")
sys.path.insert(0, HERE)
from data_parallel import CASES  # noqa: E402

# engine -> (launcher, the engine whose one-process run is its reference)
ENGINES = {"ddp": ("torchrun", "single"), "ddp_static": ("torchrun", "single"), "fsdp": ("torchrun", "single"),
           "trainer": ("torchrun", "trainer"), "trainer_ac": ("torchrun", "trainer"),
           "accelerate": ("accelerate", "single")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attempt(cmd: list, timeout: int) -> tuple:
    """One launch: (return code, the tail of its output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout[-2000:] + stderr[-4000:]


def _run(cmd: list, timeout: int = 300) -> None:
    """Runs a launch; a multi-process launch whose worker was killed by a signal (gloo's teardown has aborted a
    worker on a loaded 2-core machine) is started once more, with a warning carrying the first attempt's output.
    Every result is written again by the second attempt, so nothing from the first one is kept."""
    code, tail = _attempt(cmd, timeout)
    if code != 0 and "Signal " in tail and "received by PID" in tail:
        warnings.warn(f"a worker of {cmd[2:4]} was killed by a signal; launching again. First attempt:\n{tail}")
        ports = ("--master_port=", "--main_process_port=")  # a fresh rendezvous port for the second launch
        cmd = [next((p + str(_free_port()) for p in ports if a.startswith(p)), a) for a in cmd]
        code, tail = _attempt(cmd, timeout)
    assert code == 0, tail


class Runs:
    """Launches each launcher's engines (and the one-process references) on first use; loads their results."""

    def __init__(self, out):
        self.out = out
        self.done: set = set()
        self.failed: dict = {}

    def _launch(self, launcher: str) -> None:
        if launcher in self.done:
            return
        if launcher in self.failed:  # one failed launch fails every test that reads it, with its own message
            raise AssertionError(f"the {launcher} launch failed earlier:\n{self.failed[launcher]}")
        out = self.out / launcher
        out.mkdir(exist_ok=True)
        try:
            self._start(launcher, out)
        except AssertionError as e:
            self.failed[launcher] = str(e)
            raise
        self.done.add(launcher)

    def _start(self, launcher: str, out) -> None:
        if launcher == "reference":
            _run([sys.executable, SCRIPT, str(out), "single,trainer"])
        elif launcher == "torchrun":
            engines = ",".join(e for e, (l, _) in ENGINES.items() if l == "torchrun")
            _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                  f"--master_port={_free_port()}", SCRIPT, str(out), engines])
        else:  # --multi_gpu picks accelerate's torchrun launcher; the Accelerator itself is on the CPU
            _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                  f"--main_process_port={_free_port()}", SCRIPT, str(out), "accelerate"])

    def load(self, launcher: str, engine: str, case: str) -> dict:
        self._launch(launcher)
        return torch.load(self.out / launcher / f"{engine}-{case}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("data_parallel"))


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys() and len(want) > 0, what
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{what} {n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_data_parallel_equals_one_process(runs, engine, case):
    launcher, reference = ENGINES[engine]
    got = runs.load(launcher, engine, case)
    want = runs.load("reference", reference, case)
    assert got["world"] == 2 and want["world"] == 1
    _assert_close(got["grads"], want["grads"], "first step's gradient of")
    _assert_close(got["params"], want["params"], "after 3 steps,")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_ddp_reduces_once_per_step_with_either_schedule(runs, kind):
    """The two-sweep schedule's parameter gradients reach DDP once per backward: it all-reduces the same buckets,
    as often, as with full BPTT (one reduction of each parameter per optimizer step, not one per segment)."""
    full = runs.load("torchrun", "ddp", f"{kind}-full")["reductions_per_step"]
    two_sweep = runs.load("torchrun", "ddp", f"{kind}-two_sweep")["reductions_per_step"]
    assert two_sweep == full and len(full) == 3 and min(full) >= 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL, CUDA graphs)")
@pytest.mark.parametrize("case", CASES)
def test_ddp_with_cuda_graphs_equals_one_process(tmp_path, case):
    """On 2 GPUs, where both schedules replay their segments as CUDA graphs (CallGraphs, SegmentTrainingGraphs)."""
    _run([sys.executable, SCRIPT, str(tmp_path), "single", case, "cuda"])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
          f"--master_port={_free_port()}", SCRIPT, str(tmp_path), "ddp", case, "cuda"])
    got = torch.load(tmp_path / f"ddp-{case}.pt", weights_only=False)
    want = torch.load(tmp_path / f"single-{case}.pt", weights_only=False)
    assert got["world"] == 2
    for n in want["params"]:
        torch.testing.assert_close(got["params"][n], want["params"][n], atol=1e-4, rtol=1e-3, msg=n)
