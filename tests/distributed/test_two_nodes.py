"""Two "nodes" on one machine: `fastbond train` over 2 nodes × 1 rank, launched as on a cluster.

Each node is one launcher process with its own environment, as a second
machine would have: its own FASTBOND_CACHE (empty at the start, so each node
builds the embedded π_ref itself) and its own TMPDIR; the run directory is
shared, as it must be across nodes. The ranks meet over loopback through the
standard launchers' multi-node arguments:

* the run: `torchrun --nnodes 2 --node_rank N --nproc_per_node 1 --master_addr 127.0.0.1 --master_port P`;
* its resume from step 2: `deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 …`,
  DeepSpeed's launcher on each node without ssh, H naming the two nodes with one slot each.

Every rank runs under tests/distributed/write_audit.py, which records each
file it writes (created, renamed, removed) under the test's folder. The
tests check that the two nodes train as one process does (keyed noise: the
same tokens), that each node's cache was built once, by its own rank, and
that every file of the run directory was written by global rank 0, except a
rank's own checkpoint shards; and that the resume on two nodes continues bit
for bit. About 60 s on 2 cores (two launches, each node pretraining its
π_ref in ~10 s, and the one-process run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fastbond.embedded import VERSION
from test_train_cli import TINY as TWO_RANK_TINY
from test_train_cli import _free_port, assert_same_run, losses, max_diff, one_process_train, weights

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.distributed

NODES = 2
REPO = Path(__file__).parents[2]
AUDITED = str(Path(__file__).with_name("write_audit.py"))
TIMEOUT_S = 900  # the first DeepSpeed run on a machine also compiles its CPU comm op
TINY = TWO_RANK_TINY + ["engine.zero_stage=3"]
BUILT = f"embedded-{VERSION}-seed0"  # the embedded π_ref's directory in a cache
# The files a rank other than 0 may write: its own shards of a checkpoint, in the checkpoint's
# temporary directory (DeepSpeed's, the anchor's, its RNG and algorithm state), and the folders holding them.
SHARD = re.compile(r"checkpoints/step-\d{6}/(?:zero/zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt"
                   r"|anchor/anchor-rank(\d{5})-of-\d{5}\.safetensors|rank(\d{5})-of-\d{5}\.safetensors)")
SHARD_FOLDER = re.compile(r"checkpoints/step-\d{6}/(?:zero|anchor)")


def node_env(root: Path, node: int, audit: Path) -> dict:
    home = root / f"node{node}"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FASTBOND_CACHE=str(home / "cache"), TMPDIR=str(home / "tmp"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", FASTBOND_AUDIT_ROOT=str(root), FASTBOND_AUDIT_DIR=str(audit),
               FASTBOND_TEST_NODE=str(node))
    env.pop("TRITON_INTERPRET", None)
    return env


def torchrun(node: int, port: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--node_rank={node}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", AUDITED]


def deepspeed_no_ssh(node: int, port: int, root: Path) -> list[str]:
    hostfile = root / "hostfile"
    hostfile.write_text("".join(f"node{n} slots=1\n" for n in range(NODES)))
    return [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh",
            f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", AUDITED]


def launch(launcher, root: Path, run_dir: Path, audit: Path, *overrides: str) -> None:
    """Both nodes' launchers at once; fails with the end of their output unless both exit 0."""
    port = _free_port()
    nodes = []
    for node in range(NODES):
        log = open(root / f"{audit.name}-node{node}.log", "w")
        command = launcher(node, port, root) + ["train", *TINY, f"run_dir={run_dir}", *overrides]
        nodes.append((subprocess.Popen(command, env=node_env(root, node, audit), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO, start_new_session=True), log))
    deadline, failed_at = time.monotonic() + TIMEOUT_S, None
    while any(proc.poll() is None for proc, _ in nodes) and time.monotonic() < deadline:
        if failed_at is None and any(proc.poll() not in (None, 0) for proc, _ in nodes):
            failed_at = time.monotonic()  # the other node may wait in a collective: a grace period, then stop it
        if failed_at is not None and time.monotonic() - failed_at > 30:
            break
        time.sleep(0.5)
    for proc, log in nodes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher started here and its workers
            proc.wait()
        log.close()
    codes = [proc.returncode for proc, _ in nodes]
    if codes != [0] * NODES:
        tails = "\n".join(f"--- node {n} (exit {code}):\n" + (root / f"{audit.name}-node{n}.log").read_text()[-3000:]
                          for n, code in enumerate(codes))
        pytest.fail(f"the two nodes did not both finish:\n{tails}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """The run on two nodes (torchrun), in cluster/run; the nodes' folders in cluster/node0, cluster/node1."""
    root = tmp_path_factory.mktemp("two-nodes")
    launch(torchrun, root, root / "run", root / "audit-run")
    return root


@pytest.fixture(scope="module")
def resumed(cluster) -> Path:
    """The run's step-2 checkpoint resumed on the two nodes through DeepSpeed's launcher, in cluster/resumed."""
    run_dir = cluster / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(cluster / "run" / "checkpoints" / "step-000002", run_dir / "checkpoints" / "step-000002")
    (run_dir / "checkpoints" / "latest").write_text("step-000002\n")
    launch(deepspeed_no_ssh, cluster, run_dir, cluster / "audit-resumed", "checkpoint.resume=true")
    return run_dir


def audit(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("rank*.jsonl")) for line in path.open()]


def final_name(path: str) -> str:
    """Where a write ends up once its temporary name is renamed into place: `.tmp-step-000002` is
    `step-000002`, `.name.tmp-123` (fastbond.atomic's siblings) is `name`."""
    path = re.sub(r"(^|/)\.tmp-(step-\d{6})(?=/|$)", r"\1\2", path)
    return re.sub(r"(^|/)\.([^/]+)\.tmp-\d+(?=/|$)", r"\1\2", path)


def writers(records: list[dict], run_dir: Path) -> dict[str, set[int]]:
    """The ranks that wrote each path of `run_dir` (relative, final names), renames' sources included."""
    found = defaultdict(set)
    prefix = str(run_dir.resolve()) + os.sep
    for record in records:
        if record["path"].startswith(prefix):
            found[final_name(record["path"][len(prefix):])].add(int(record["rank"]))
    return found


def expected_writer(path: str) -> int:
    """Global rank 0, unless `path` is a rank's own checkpoint shard."""
    shard = SHARD.fullmatch(path)
    return 0 if shard is None else int(next(group for group in shard.groups() if group is not None))


def assert_written_by_main_only(run_dir: Path, records: list[dict], before: set[str] = frozenset()) -> None:
    wrote = writers(records, run_dir)
    files = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()} - set(before)
    assert files, f"{run_dir} holds no file"
    # every file the run left has a recorded writer (else the audit missed how it was written) ...
    assert {f: wrote.get(f, set()) for f in files} == {f: {expected_writer(f)} for f in files}
    # ... and the other ranks wrote nothing else there, not even a file they removed again
    for path, ranks in wrote.items():
        others = {rank for rank in ranks if rank != expected_writer(path)}
        assert not others or SHARD_FOLDER.fullmatch(path), f"rank(s) {sorted(others)} wrote {run_dir / path}"


def test_two_nodes_train_like_one_process(cluster, tmp_path):
    """The same losses and weights as the one-process run on node 0's π_ref (and node 1's is the same)."""
    caches = [cluster / f"node{n}" / "cache" / BUILT for n in range(NODES)]
    assert (caches[0] / "model.safetensors").read_bytes() == (caches[1] / "model.safetensors").read_bytes()
    one = one_process_train(caches[0].parent, tmp_path / "one")
    assert_same_run(cluster / "run", one)


def test_each_node_builds_its_cache_once_and_keeps_to_its_own_folders(cluster):
    """One build of the embedded π_ref per node, by that node's rank, into that node's cache; no rank
    writes into another node's cache or temporary folder; no build left a temporary folder behind."""
    records, root = audit(cluster / "audit-run"), cluster.resolve()
    assert {record["rank"] for record in records} == {"0", "1"}
    builds = defaultdict(list)  # cache → ranks that renamed a finished build into place
    for record in records:
        path = Path(record["path"])
        if record["event"] == "os.rename" and path.name == BUILT:
            builds[path.parent.relative_to(root).as_posix()].append(int(record["rank"]))
        for node in range(NODES):
            if path.is_relative_to(root / f"node{node}"):
                assert record["node"] == str(node), f"rank {record['rank']} on node {record['node']} wrote {path}"
    assert dict(builds) == {f"node{n}/cache": [n] for n in range(NODES)}  # node n's rank is global rank n
    for node in range(NODES):
        cache = cluster / f"node{node}" / "cache"
        assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [BUILT]
        assert (cache / BUILT / "config.json").is_file() and (cache / BUILT / "model.safetensors").is_file()


def test_only_global_rank_0_writes_the_run_directory(cluster, resumed):
    """Every file of the run directory written by rank 0, save each rank's own checkpoint shards, in the
    run and in its resume (the checkpoint copied in before the resume is not the resume's)."""
    assert_written_by_main_only(cluster / "run", audit(cluster / "audit-run"))
    source = cluster / "run" / "checkpoints" / "step-000002"
    copied = {f"checkpoints/step-000002/{p.relative_to(source)}" for p in source.rglob("*") if p.is_file()}
    assert_written_by_main_only(resumed, audit(cluster / "audit-resumed"), copied)


def test_resume_on_two_nodes_continues_exactly(cluster, resumed):
    """Saved on two nodes (torchrun), resumed on two nodes (deepspeed --no_ssh): step 3 as before, bit for bit."""
    run = cluster / "run"
    assert losses(resumed) == {3: losses(run)[3]}
    assert max_diff(weights(resumed / "policy"), weights(run / "policy")) == 0.0
    from safetensors.torch import load_file

    for name in ("anchor-rank00000-of-00002.safetensors", "anchor-rank00001-of-00002.safetensors"):
        before = load_file(str(run / "checkpoints" / "step-000003" / "anchor" / name))
        after = load_file(str(resumed / "checkpoints" / "step-000003" / "anchor" / name))
        assert max_diff(before, after) == 0.0
