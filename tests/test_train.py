"""Supernet training: config validation, sampling, losses, and end-to-end runs of `nas4dyn train` on the tiny
space with synthetic data (every phase, SIGKILL + exact resume, corrupt checkpoints, 2-rank torchrun)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import nas4dyn
from nas4dyn.cli.main import main
from nas4dyn.errors import ConfigError, DivergenceError
from nas4dyn.data import load_data
from supernet.network import GateTrace, RouteTrace
from nas4dyn.train.config import PRESETS, build_config, config_from_mapping
from nas4dyn.train.distributed import DistEnv, ShardedBatches, sync_gradients
from nas4dyn.train.evaluation import evaluate_phase
from nas4dyn.train.losses import gated_mac_rate, subnet_loss
from nas4dyn.train.precision import resolve_precision
from nas4dyn.train.sampling import restrict, sandwich
from nas4dyn.train.schedule import make_optimizer, plan_phases
from nas4dyn.train.trainer import Trainer
from tests.conftest import all_space

TINY = {
    "batch_size": 32,
    "bn_recal_images": 64,
    "checkpoint_every": 3,
    # The full phase reads augmented images and the next ones plain images: resume must survive the switch.
    "phases": {"full": {"epochs": 0.3, "warmup_epochs": 0.1, "augment": True, "min_steps": 0},
               "kernel": {"epochs": 0.25, "augment": False, "min_steps": 0}, "depth": {"epochs": 0.25, "min_steps": 0},
               "width": {"epochs": 0.25, "min_steps": 0}, "dynamic": {"epochs": 0.4, "min_steps": 0}},
}
PHASES = ["full", "kernel", "depth", "width", "dynamic"]


def train_cmd(out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nas4dyn", "train", "--space", "tiny", "--data", "synthetic", "--out", str(out),
            "--config", str(config), "--threads", "1", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "supernet.pt", weights_only=True)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run(train_cmd(out, tiny_config))
    assert result.returncode == 0, result.stderr
    return out


# ---- units --------------------------------------------------------------------------------------------------
def test_config_layers_and_every_problem_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_random: 3\nphases: {width: {epochs: 2}}\n")
    cfg = build_config("quick", path, ["phases.width.lr=0.01", "kd_ratio=0.5"])
    width = next(p for p in cfg.phases if p.name == "width")
    assert (cfg.num_random, width.epochs, width.lr, cfg.kd_ratio) == (3, 2, 0.01, 0.5)
    assert [p.name for p in cfg.phases] == PHASES == [p["name"] for p in PRESETS["default"]["phases"]]
    with pytest.raises(ConfigError) as exc:
        build_config("default", None, ["batch_size=0", "phases.depth.elastic=[kernel, colour]", "lr=1", "momentum=x",
                                       "precision=fp16", "random_erasing=2"])
    for word in ("batch_size: 0", "colour", "lr: unknown key", "momentum: 'x'", "precision: 'fp16'",
                 "random_erasing: 2"):
        assert word in str(exc.value)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("huge")


def test_switching_the_batch_stream_to_plain_images_keeps_its_order():
    """A phase that turns augmentation off reads the same images, in the same order, from where it was."""
    labels = torch.arange(24)
    augmented = torch.utils.data.TensorDataset(labels.float() + 0.5, labels)
    plain = torch.utils.data.TensorDataset(labels.float(), labels)
    reference, switched = (ShardedBatches(augmented, 4, 7, DistEnv()) for _ in range(2))
    for step in range(15):  # across an epoch boundary (6 batches per epoch)
        if step in (4, 9):
            switched.use(plain if step == 4 else augmented)
        (x_ref, y_ref), (x, y) = reference.next(), switched.next()
        assert torch.equal(y, y_ref)
        assert torch.equal(x, y.float() if 4 <= step < 9 else x_ref)


def test_sampling_is_a_pure_function_restricted_to_the_phase(tiny_space):
    elastic = {"resolution", "kernel", "depth", "width", "exits", "gates"}
    a = sandwich(tiny_space, elastic, 3, seed=5, phase=4, step=17, threshold=0.5)
    assert a == sandwich(tiny_space, elastic, 3, seed=5, phase=4, step=17, threshold=0.5)
    assert a != sandwich(tiny_space, elastic, 3, seed=5, phase=4, step=18, threshold=0.5)
    assert [s.role for s in a] == ["max", "min", "random", "random", "random"]
    assert a[0].arch.without_dynamic() == tiny_space.max_arch() and a[0].arch.exits
    top = tiny_space.max_arch()
    for _, arch in sandwich(tiny_space, {"kernel"}, 4, seed=0, phase=1, step=3, threshold=0.5)[1:]:
        assert (arch.resolution, arch.depths, arch.widths) == (top.resolution, top.depths, top.widths)
        assert not arch.is_dynamic
    assert [s.role for s in sandwich(tiny_space, set(), 2, 0, 0, 0, 0.5)] == ["max"]
    small = restrict(tiny_space, tiny_space.min_arch(), {"depth"})
    assert small.depths == tiny_space.min_arch().depths and small.kernels[0] == (max(tiny_space.stages[0].kernels),)


def test_gated_mac_rate_weights_gates_by_their_macs():
    on = GateTrace(0, 0, "channel", torch.ones(2, 4), 10.0)
    off = GateTrace(0, 1, "skip", torch.zeros(2), 120.0)
    assert gated_mac_rate([]) is None
    assert torch.allclose(gated_mac_rate([on, off]), torch.full((2,), 40.0 / 160.0))


def test_block_budget_pulls_every_gate_toward_the_target():
    """The global rate can sit on target with one gate always on and another always off; the per-block term
    sees that and pushes the open gate down and the closed one up."""
    config = build_config("quick", overrides=["budget_target=0.5", "budget_weight=1", "block_budget_weight=0"])
    on = torch.ones(4, 3, requires_grad=True)
    off = torch.zeros(4, requires_grad=True)
    trace = [GateTrace(0, 0, "channel", on, 10.0), GateTrace(0, 1, "skip", off, 30.0)]
    outs, y = [torch.randn(4, 10)], torch.arange(4)
    loss, parts = subnet_loss(outs, y, None, trace, config)
    assert parts["budget"] == 0.0 and "block_budget" not in parts
    config.block_budget_weight = 1.0
    loss, parts = subnet_loss(outs, y, None, trace, config)
    loss.backward()
    assert parts["block_budget"] == 0.25
    assert (on.grad > 0).all() and (off.grad < 0).all()


def test_paths_are_sampled_only_where_the_phase_makes_them_elastic():
    space = all_space()
    with_paths = [a for step in range(30) for _, a in sandwich(space, {"gates", "paths"}, 2, 0, 0, step, 0.5)]
    assert {a.paths[2] for a in with_paths} == {1, 2, 3}
    without = [a for step in range(30) for _, a in sandwich(space, {"gates", "depth"}, 2, 0, 0, step, 0.5)]
    assert {a.paths for a in without} == {(1, 1, 1)}


def test_information_gain_term_reaches_the_router_only_when_weighted():
    probs = torch.softmax(torch.randn(6, 2, requires_grad=True), dim=1)
    y, outs = torch.arange(6) % 3, [torch.randn(6, 10)]
    config = build_config("quick")
    loss, parts = subnet_loss(outs, y, None, [], config, [RouteTrace(2, 0, probs)])
    assert "ig" in parts and loss.requires_grad
    config.ig_weight = 0.0
    assert "ig" not in subnet_loss(outs, y, None, [], config, [RouteTrace(2, 0, probs)])[1]


def test_dynamic_parts_learn_at_their_own_rate():
    config = build_config("quick", overrides=["dynamic_lr_scale=4"])
    net = nas4dyn.build_supernet(all_space())
    plan = plan_phases(config, 10)[-1]
    lr = {name: g["lr"] for g in make_optimizer(net, plan, config)[0].param_groups
          for name, p in net.named_parameters() if any(p is q for q in g["params"])}
    assert len(lr) == len(list(net.parameters()))
    assert lr["gater.fc2.weight"] == lr["stages.0.0.emg_gate.threshold"] == 4 * plan.config.lr
    assert lr["stages.0.0.conv1.weight"] == lr["classifier.fc.weight"] == plan.config.lr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_decides_the_dtype_of_training_convolutions_only(tmp_path, tiny_space, precision):
    config = build_config("quick", overrides=[f"precision={precision}", "batch_size=8"])
    trainer = Trainer(tiny_space, load_data("synthetic", synthetic={"n_train": 40, "n_test": 8}), config, tmp_path)
    conv_outputs = []
    for m in trainer.net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _x, out: conv_outputs.append(out.dtype))
    plan = trainer.plans[-1]  # the dynamic phase: a sandwich with a teacher, exits and gates
    x, y = trainer.stream.next()
    logs = trainer.train_step(plan, x, y, make_optimizer(trainer.net, plan, config)[0])
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert conv_outputs and set(conv_outputs) == {expected}
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
    assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in trainer.net.parameters())
    assert torch.isfinite(torch.tensor(logs["loss"]))


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                       (False, True, "bf16")])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert (resolve_precision("fp32", cpu), resolve_precision("bf16", cpu)) == ("fp32", "bf16")


def test_phase_probes_measure_the_first_val_images_only(tiny_net):
    data = load_data("synthetic", synthetic={"n_train": 300, "n_test": 40})
    first = torch.utils.data.Subset(data.val, range(7))
    some, whole = (build_config("quick", overrides=[f"val_images={n}"]) for n in (7, 0))

    def probe(val, config):
        return evaluate_phase(tiny_net, [], data.train_eval, val, config, 0, DistEnv())["max"]["val_acc"]

    assert probe(data.val, some) == probe(first, whole) != probe(data.val, whole)


def test_dynamic_phase_trains_every_mechanism_and_reports_its_rates(tmp_path):
    """A few steps on tiny_all: routers anneal and learn, and the phase reports path and per-kind gate rates
    (width gates included)."""
    config = config_from_mapping({
        "batch_size": 16, "bn_recal_images": 32, "num_random": 2, "router_temperature_start": 4.0,
        "router_temperature_end": 0.5, "phases": [{"name": "dynamic", "epochs": 0.6, "lr": 0.05,
                                                    "elastic": ["kernel", "exits", "gates", "paths"]}]})
    data = load_data("synthetic", synthetic={"n_train": 120, "n_test": 20})
    trainer = Trainer(all_space(), data, config, tmp_path / "run")
    plan = trainer.plans[0]
    assert plan.steps >= 3
    temperatures = []
    for trainer.step in (0, plan.steps - 1, 0):
        temperatures.append(trainer.router_temperature(plan))
    assert temperatures == pytest.approx([4.0, 0.5, 4.0])
    before = {k: v.clone() for k, v in trainer.net.routers.state_dict().items()}
    subnets = trainer.run()["phases"][0]["subnets"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.net.routers.state_dict().items())
    shares = subnets["max_routed"]["path_rates"]["2.0"]
    assert len(shares) == 3 and sum(shares) == pytest.approx(1.0)
    assert {"max_skip", "max_emg", "max_dfs", "max_width"} <= set(subnets)
    assert all(subnets[f"max_{kind}"]["gate_rates"] for kind in ("skip", "emg", "dfs", "width"))


# ---- end to end ---------------------------------------------------------------------------------------------
def test_run_through_every_phase_writes_the_artifacts(finished_run):
    out = finished_run
    for name in ("supernet.pt", "space.json", "train_metrics.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [p["name"] for p in metrics["phases"]] == PHASES
    for phase in metrics["phases"]:
        assert 0.0 <= phase["max_val_acc"] <= 1.0 and 0.0 <= phase["min_val_acc"] <= 1.0
        assert phase["wall_time_s"] > 0 and phase["steps"] >= 1
    dynamic = metrics["phases"][-1]
    assert len(dynamic["exit_rates"]) == len(nas4dyn.load_space("tiny").exits.positions) + 1
    assert abs(sum(dynamic["exit_rates"]) - 1.0) < 1e-6 and dynamic["gate_rates"]
    net = nas4dyn.load_supernet(out)
    assert net.space.name == "tiny" and nas4dyn.load_space(str(out / "space.json")) == net.space
    blob = torch.load(out / "supernet.pt", weights_only=True)
    assert blob["data"]["dataset"] == "synthetic" and blob["data"]["num_classes"] == 10


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_config, finished_run):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, tiny_config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "supernet.pt").exists(), "the run finished before it could be killed"
    resumed = run(train_cmd(out, tiny_config, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at phase" in resumed.stderr
    assert max_difference(weights(out), weights(finished_run)) <= 1e-6


def one_error_line(argv: list[str], capsys) -> str:
    """Run the CLI in-process (a subprocess per error case would only add start-up time)."""
    threads = torch.get_num_threads()
    try:
        assert main(argv[3:]) == 2
    finally:
        torch.set_num_threads(threads)  # the CLI sets --threads 1 for this process
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_corrupt_truncated_or_foreign_checkpoint_is_one_line_exit_2(tmp_path, tiny_config, finished_run, capsys):
    good = (finished_run / "checkpoint.pt").read_bytes()
    for label, data in (("truncated", good[: len(good) // 3]), ("garbage", b"not a checkpoint" * 50)):
        out = tmp_path / label
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(data)
        assert "checkpoint.pt" in one_error_line(train_cmd(out, tiny_config, "--resume"), capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pt").write_bytes(good)
    cmd = train_cmd(foreign, tiny_config, "--resume")
    cmd[cmd.index("tiny")] = "fmnist"
    assert "space" in one_error_line(cmd, capsys)
    assert "--resume" in one_error_line(train_cmd(finished_run, tiny_config), capsys)  # no silent overwrite


def test_bad_config_value_is_one_line_exit_2_naming_it(tmp_path, tiny_config, capsys):
    line = one_error_line(train_cmd(tmp_path / "bad", tiny_config, "--set", "phases.width.lr=-1"), capsys)
    assert "phases.width.lr" in line and "-1" in line
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("budget_target: 1.5\n")
    assert "budget_target" in one_error_line(train_cmd(tmp_path / "bad2", bad_yaml), capsys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path, tiny_config):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *train_cmd(out, tiny_config)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    checksums = metrics["rank_checksums"]
    assert metrics["world_size"] == 2 and len(checksums) == 2
    assert checksums[0] == checksums[1] and metrics["ranks_consistent"]
    assert [p["name"] for p in metrics["phases"]] == PHASES


def test_every_float_notation_is_a_number_and_non_finite_values_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 5e-4\nphases: {width: {lr: 1E-2}}\n")
    cfg = build_config("quick", path, ["phases.full.lr=1e-3", "kd_ratio=5E-1", "phases.kernel.lr=.5",
                                       "momentum=9e-1"])
    lrs = {p.name: p.lr for p in cfg.phases}
    assert (cfg.weight_decay, lrs["width"], lrs["full"], cfg.kd_ratio, lrs["kernel"], cfg.momentum) == (
        5e-4, 1e-2, 1e-3, 0.5, 0.5, 0.9)
    with pytest.raises(ConfigError) as exc:
        build_config("quick", None, ["phases.full.lr=.nan", "grad_clip=.inf"])
    assert "phases.full.lr: nan" in str(exc.value) and "grad_clip: inf" in str(exc.value)


def test_diverging_phase_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    """A learning rate of 1e30 in the second phase: exit 2 naming phase, step and cause; the checkpoint of the
    first phase's end is kept (finite), and no supernet.pt or metrics are written."""
    out = tmp_path / "diverged"
    result = run(train_cmd(out, tiny_config, "--set", "phases.kernel.lr=1e30"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr
    for word in ("phase kernel", "step", "phases.kernel.lr (now 1e+30)", "grad_clip", "last good checkpoint"):
        assert word in errors[0]
    assert not (out / "supernet.pt").exists() and not (out / "train_metrics.json").exists()
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (blob["phase"], blob["step"]) == (1, 0)
    assert all(bool(torch.isfinite(t).all()) for t in blob["model"].values() if t.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_space):
    config = build_config("quick", overrides=["batch_size=8"])
    trainer = Trainer(tiny_space, load_data("synthetic", synthetic={"n_train": 40, "n_test": 8}), config, tmp_path)
    with torch.no_grad():
        next(trainer.net.parameters()).fill_(float("nan"))
    plan = trainer.plans[0]
    opt, sched = make_optimizer(trainer.net, plan, config)
    with pytest.raises(DivergenceError, match="1 of .* weight tensors are not finite"):
        trainer._save(opt, sched, time.perf_counter())
    assert not (tmp_path / "checkpoint.pt").exists()


def _sync_on_rank(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        net = torch.nn.Linear(2, 1)
        for p in net.parameters():
            p.grad = torch.full_like(p, float(rank))
        loss = float("inf") if rank == 1 else 0.5  # only rank 1 sees a non-finite loss
        mean = sync_gradients(net, DistEnv(rank=rank, world_size=2), loss)
        torch.save({"loss": mean, "grad": net.weight.grad.clone()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_sees_a_non_finite_loss_of_any_rank(tmp_path):
    # A rank that stopped alone would leave the others waiting in the next all-reduce.
    torch.multiprocessing.spawn(_sync_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    results = [torch.load(tmp_path / f"r.{rank}", weights_only=True) for rank in (0, 1)]
    assert all(r["loss"] == float("inf") for r in results)
    assert all(torch.equal(r["grad"], torch.full((1, 2), 0.5)) for r in results)


def test_default_threads_follow_the_usable_cores(monkeypatch):
    from nas4dyn.cli import train as train_cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # pinned to one core
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train_cli._threads(0) == 1 and train_cli._threads(4) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks share the four cores
    assert train_cli._threads(0) == 2
