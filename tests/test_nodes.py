"""Several nodes under torchrun, sharing only a bucket of the local S3 server: each node is a launch in a
folder of its own; a node lost, a worker killed under ``--max-restarts``."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cropyield import load_regressor

from .conftest import BIN, ROOT_DIR, free_port, run, upload
from .test_streaming import write_folder

pytestmark = pytest.mark.slow

# Streamed SGD over 8 row groups, checkpoints every 4 steps (mid-epoch), 2 epochs of 10 steps a process. One
# step a call: by default one call trains a whole epoch here, and a step checkpoint is written only where a call ends.
SGD = ["--data.streaming", "true", "--data.batch_size", "20", "--data.shuffle_buffer", "100",
       "--data.standardize", "true", "--model.lr", "0.05", "--trainer.max_epochs", "2",
       "--checkpoint.every_n_train_steps", "4", "--data.steps_per_call", "1"]  # fmt: skip
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT_DIR), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3_server):
    """The data on the bucket, and the uninterrupted reference: one node, two processes."""
    import pyarrow.fs as pafs

    name = f"nodes-{os.getpid()}"
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(name)
    folder = tmp_path_factory.mktemp("nodes")
    rows = write_folder(folder / "d", sizes=(200, 200), row_group=50)
    url = upload(folder / "d", f"s3://{name}/data/")
    root = f"s3://{name}/reference"
    run("cropyield", "fit", "--data.data_path", url, *SGD, *DDP, "--trainer.devices", "2",
        "--trainer.default_root_dir", root, cwd=folder, env=ENV)  # fmt: skip
    return name, url, rows, load_regressor(f"{root}/checkpoints/last.ckpt")


def launch_nodes(folder, port, *args, nodes=2) -> list[subprocess.Popen]:
    """``torchrun`` once per node, each in ``folder/node<R>`` (its own session, so it can be killed whole)."""
    launches = []
    for rank in range(nodes):
        cwd = folder / f"node{rank}"
        cwd.mkdir(parents=True, exist_ok=True)
        command = [BIN / "torchrun", "--nnodes", nodes, "--nproc-per-node", 1, "--node-rank", rank,
                   "--master-addr", "127.0.0.1", "--master-port", port, BIN / "cropyield", "fit",
                   "--trainer.num_nodes", nodes, "--trainer.devices", 1, *DDP, *args]  # fmt: skip
        launches.append(
            subprocess.Popen(
                list(map(str, command)),
                cwd=cwd,
                env={**os.environ, **ENV},
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return launches


def finish(launches, timeout=300) -> list[tuple[int, str, str]]:
    results = []
    for p in launches:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_node(p)
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


def kill_node(launch: subprocess.Popen) -> None:
    """SIGKILLs a launch and every process under it (torchrun starts each worker in a session of its own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(pid)
    tree, queue = [], [launch.pid]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue += parents.get(pid, [])
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def same_weights(a, b) -> bool:
    return torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, data):
    name, url, rows, reference = data
    root = f"s3://{name}/two-nodes"
    results = finish(
        launch_nodes(tmp_path, free_port(), "--data.data_path", url, *SGD, "--trainer.default_root_dir", root)
    )
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert same_weights(load_regressor(f"{root}/checkpoints/last.ckpt"), reference)
    assert [p.name for p in (tmp_path / "node1").iterdir()] == []  # node 1 wrote nothing locally
    # The exact fit on two nodes: the one-process least-squares solution, to float64 rounding.
    root = f"s3://{name}/exact"
    exact = ["--config", "exact.yaml", "--data.data_path", url, "--data.streaming", "true", "--data.batch_size", "64"]
    results = finish(launch_nodes(tmp_path / "exact", free_port(), *exact, "--trainer.default_root_dir", root))
    assert [rc for rc, _, _ in results] == [0, 0], results
    model = load_regressor(f"{root}/checkpoints/last.ckpt")
    run("cropyield", "fit", *exact, cwd=tmp_path / "exact")  # one process, on this machine
    one = load_regressor(tmp_path / "exact" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(model.linear.weight, one.linear.weight, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.linear.bias, one.linear.bias, rtol=1e-6, atol=0)
    x, y = rows[:, :3].astype(np.float64), rows[:, 3:].astype(np.float64)
    design = np.c_[x, np.ones(len(x))]
    optimum = ((design @ np.linalg.lstsq(design, y, rcond=None)[0] - y) ** 2).mean()
    w, b = model.linear.weight.detach().double().numpy(), model.linear.bias.detach().double().numpy()
    assert ((x @ w.T + b - y) ** 2).mean() / optimum - 1 < 1e-6  # the least-squares optimum


def test_a_lost_node_ends_the_survivor_within_the_timeout_and_a_relaunch_resumes_exactly(tmp_path, data):
    name, url, _, reference = data
    root = f"s3://{name}/lost"
    args = ["--data.data_path", url, *SGD, "--trainer.default_root_dir", root, "--ddp_timeout", "10"]
    launches = launch_nodes(tmp_path, free_port(), *args,
                            "--trainer.callbacks+=tests.node_helpers.StopAt", "--trainer.callbacks.step=6")  # fmt: skip
    deadline = time.monotonic() + 200
    while not (tmp_path / "node1" / "stopped").exists():
        assert time.monotonic() < deadline and launches[1].poll() is None, finish(launches, 1)
        time.sleep(0.5)
    kill_node(launches[1])  # node 1 lost: its launcher and its worker
    killed = time.monotonic()
    [(rc, _, err)] = finish(launches[:1], timeout=120)
    assert rc != 0 and time.monotonic() - killed < 10 + 30, err
    finish(launches[1:])
    lost = [line for line in err.splitlines() if line.startswith("cropyield: error: a peer process was lost")]
    assert len(lost) == 1, err
    results = finish(launch_nodes(tmp_path / "again", free_port(), *args, "--ckpt_path", "last"))
    assert [rc for rc, _, _ in results] == [0, 0], results
    restored = f"Restoring states from the checkpoint path at {root}/checkpoints/last.ckpt"
    assert restored in results[0][1] + results[0][2], results  # from step 4's checkpoint, not from scratch
    assert same_weights(load_regressor(f"{root}/checkpoints/last.ckpt"), reference)


def test_torchrun_restarts_a_group_whose_worker_was_killed_and_it_resumes_exactly(tmp_path, data):
    name, url, _, reference = data
    root = f"s3://{name}/restarted"
    # A store of its own for each attempt: torchrun's shared one keeps the failed group's addresses.
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    result = run("torchrun", "--nnodes", 1, "--nproc-per-node", 2, "--max-restarts", 1, "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{free_port()}", BIN / "cropyield", "fit", "--trainer.devices", 2,
                 *DDP, "--data.data_path", url, *SGD, "--trainer.default_root_dir", root, "--ckpt_path", "last",
                 "--ddp_timeout", "30", "--trainer.callbacks+=tests.node_helpers.StopAt",
                 "--trainer.callbacks.step=6", "--trainer.callbacks.action=kill",
                 cwd=tmp_path, env=env, timeout=240)  # fmt: skip
    assert (tmp_path / "killed").read_text() == "6"  # rank 1 was killed mid-epoch, in the first attempt
    output = result.stdout + result.stderr
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in output  # no warning: each attempt has a store of its own
    assert f"Restoring states from the checkpoint path at {root}/checkpoints/last.ckpt" in output, output
    assert same_weights(load_regressor(f"{root}/checkpoints/last.ckpt"), reference)


def test_torchrun_restarts_sharing_one_store_are_warned_about_before_training(tmp_path):
    port = free_port()
    result = run("torchrun", "--nnodes", 1, "--nproc-per-node", 1, "--max-restarts", 1, "--master-port", port,
                 BIN / "cropyield", "fit", "--trainer.devices", 1, *DDP, "--trainer.max_epochs", 1,
                 cwd=tmp_path, env=ENV, timeout=240)  # fmt: skip
    warned = [line for line in result.stderr.splitlines() if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line]
    assert len(warned) == 1 and warned[0].startswith("cropyield: warning: torchrun --max-restarts"), result.stderr
