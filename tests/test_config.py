"""The experiment file: every experiment validates and expands; mistakes are named and refused."""
from pathlib import Path

import pytest
import yaml

import sweep
from config.errors import ConfigError
from config.schema import resolve, trial_configs
from launch.checks import absolute_paths
from tests.conftest import ROOT, TINY, write_experiments

EXPECTED_TRIALS = {"resnet18-cutout": 1, "cifar10-stress": 36, "cifar100-resnet18": 1, "lr-search": 16, "quick": 6}


@pytest.mark.parametrize("name", sorted(EXPECTED_TRIALS))
def test_every_experiment_validates_and_dry_runs(name, capsys):
    _, cfg = resolve(ROOT / "experiments.yaml", name)
    assert len(trial_configs(cfg)) == EXPECTED_TRIALS[name]
    assert sweep.main(["--config", str(ROOT / "experiments.yaml"), "--experiment", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"experiment {name}: {EXPECTED_TRIALS[name]} trials" in out


def test_the_file_names_every_experiment_we_expect():
    raw = yaml.safe_load((ROOT / "experiments.yaml").read_text())
    assert set(raw["experiments"]) == set(EXPECTED_TRIALS) and raw["default_experiment"] == "cifar10-stress"


def test_main_study_is_seed_000s_settings():
    _, cfg = resolve(ROOT / "experiments.yaml", "cifar10-stress")
    assert (cfg.epochs, cfg.batch_size, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.nesterov, cfg.optimizer.weight_decay) == (50, 128, 0.1, 0.9, True, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == ("multistep", [25, 40], 0.1)
    combos = {(t.arch, t.augment, t.seed) for t in trial_configs(cfg)}
    assert len(combos) == 36 and {a for a, _, _ in combos} == {"plain_cnn", "residual_cnn", "se_cnn", "resnet18"}


def test_set_overrides_a_gridded_setting_and_nested_paths():
    _, cfg = resolve(ROOT / "experiments.yaml", "quick", ["arch=se_cnn", "data.name=imagefolder", "data.root=/x", "epochs=2"])
    trials = trial_configs(cfg)
    assert len(trials) == 2 and {t.arch for t in trials} == {"se_cnn"}
    assert trials[0].data.name == "imagefolder" and trials[0].data.root == "/x" and trials[0].epochs == 2


MISTAKES = [
    ({"grid": {"arch": ["plain_cnn", "plain_cnn", "resnet19"]}}, [], "experiments.bad.grid.arch[2]: unknown model 'resnet19'; known: plain_cnn, residual_cnn, resnet18, se_cnn"),
    ({"augment": "mixup"}, [], "experiments.bad.augment: unknown augmentation 'mixup'; known: cropflip, cutout, none"),
    ({"data": {"name": "imagenet"}}, [], "experiments.bad.data.name: unknown dataset 'imagenet'; known: cifar10, cifar100, imagefolder, synthetic"),
    ({"epochs": 0}, [], "experiments.bad.epochs: must be >= 1, got 0"),
    ({"optimizer": {"lr": -0.1}}, [], "experiments.bad.optimizer.lr: must be > 0, got -0.1"),
    ({"data": {"val_fraction": 1.2}}, [], "experiments.bad.data.val_fraction: must be in [0, 1), got 1.2"),
    ({"epochz": 3}, [], "experiments.bad.epochz: unknown key 'epochz'; known:"),
    ({"batch_size": "big"}, [], "experiments.bad.batch_size: expected int, got str 'big'"),
    ({"grid": {"optimizer.lr": {"loguniform": [0.1, 0.01]}}}, [], "experiments.bad.grid.optimizer.lr.loguniform: expected [low, high] numbers with low < high"),
    ({"scheduler": {"name": "hyperband"}}, [], "experiments.bad.scheduler.name: unknown scheduler 'hyperband'; known: none, asha"),
    ({"model": {"depth": 3}}, [], "experiments.bad.model: plain_cnn rejects {'widths': [8, 16, 16], 'depth': 3}"),
    ({"model": {"widths": []}}, [], "experiments.bad.model: plain_cnn rejects {'widths': []}: widths must be a non-empty list of positive integers, got []"),
    ({"arch": "se_cnn", "model": {"reduction": 0}}, [], "experiments.bad.model: se_cnn rejects {'widths': [8, 16, 16], 'reduction': 0}: reduction must be a positive integer, got 0"),
    ({"grid": {"model.widths": [[8, 16], [8, 0]]}}, [], "experiments.bad.grid.model.widths[1]: plain_cnn rejects {'widths': [8, 0]}: widths must be a non-empty list"),
    ({}, ["model.widths=[8,8,8,8,8,8,8]"], "--set model.widths: plain_cnn rejects {'widths': [8, 8, 8, 8, 8, 8, 8]}: widths has 7 stages, at most 6"),
    ({}, ["seed=-1"], "--set seed: must be in [0, 4294967295], got -1"),
    ({"data": {"split_seed": 2**32}}, [], "experiments.bad.data.split_seed: must be in [0, 4294967295], got 4294967296"),
    ({"data": {"val_fraction": 0}}, [], "metric: val/acc needs a validation split (data.val_fraction > 0): the trials are compared on it"),
    ({}, ["epochs=[1"], "--set epochs: '[1' is not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ({}, ["model={widths: [8], widths: [4]}"], "--set model: '{widths: [8], widths: [4]}' is not valid YAML (duplicate key 'widths' (first on line 1))"),
    ({"grid": {"seed": [1, 2, 1]}}, [], "experiments.bad.grid.seed[2]: 1 is listed twice (also at [0]): each grid point would run twice"),
    ({"grid": {"model.widths": [[8, 8], [8, 8]]}}, [], "experiments.bad.grid.model.widths[1]: [8, 8] is listed twice (also at [0])"),
    ({"schedule": {"name": "multistep"}, "epochs": 3}, [], "experiments.bad.schedule.milestones: milestones [25, 40] are not inside epochs 1..2"),
    ({}, ["optimizer.momentm=0.9"], "--set optimizer.momentm: unknown key 'momentm'"),
    ({"resources": {"gpu": 2}}, [], "experiments.bad.resources.gpu: 2 GPU per trial but this machine has 0"),
    ({}, ["optimizer.lr=abc"], "--set optimizer.lr: expected float, got str 'abc'"),
    ({}, ["amp=no"], "--set amp: expected bool, got str 'no'"),  # YAML 1.2: only true/false are booleans
    ({"adversarial": True, "adversarial_step_size": 2}, [], "experiments.bad.adversarial_step_size: must be in (0, 1] (a fraction of epsilon), got 2"),
    ({}, ["adversarial_images=0"], "--set adversarial_images: must be >= 1, got 0"),
    ({}, ["augment_params.cutout.length=-3"], "--set augment_params.cutout.length: must be an integer in [1, 32], got -3"),
    ({}, ["augment_params.crop.paddin=4"], "--set augment_params.crop.paddin: unknown parameter 'paddin' of crop; known: padding"),
    ({"augment_params": {"flip": {"p": 1.5}}}, [], "experiments.bad.augment_params.flip.p: must be a number in [0, 1], got 1.5"),
    ({"augment_params": {"mixup": {}}}, [], "experiments.bad.augment_params.mixup: unknown augmentation op 'mixup'; known: crop, cutout, flip"),
    ({}, ["resources.gpu=.inf"], "--set resources.gpu: must be a finite number, got inf"),
    ({}, ["resources.cpu=.nan"], "--set resources.cpu: must be a finite number, got nan"),
    ({}, ["optimizer.lr=.nan"], "--set optimizer.lr: must be a finite number, got nan"),
    ({}, ["optimizer.weight_decay=-.inf"], "--set optimizer.weight_decay: must be a finite number, got -inf"),
    ({}, ["grad_clip=.nan"], "--set grad_clip: must be a finite number, got nan"),
    ({}, ["scheduler.reduction_factor=.nan"], "--set scheduler.reduction_factor: must be a finite number, got nan"),
    ({"grid": {"optimizer.lr": [0.1, 0.1e400]}}, [], "experiments.bad.grid.optimizer.lr[1]: must be a finite number, got inf"),
]


def test_numbers_are_read_as_people_type_them_in_the_yaml_and_in_set(tmp_path):
    """YAML 1.2 scalars: PyYAML's default (YAML 1.1) reads 1e-3 as a string and `no` as False."""
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"defaults": TINY, "experiments": {}})
                    .replace("experiments: {}", "experiments:\n  typed:\n    optimizer: {lr: 1e-3, weight_decay: 5e-4}\n"
                                                "    data: {name: synthetic, n_train: 400, n_test: 120, val_fraction: .25}\n"
                                                "    description: no\n"))
    assert yaml.safe_load(path.read_text())["experiments"]["typed"]["optimizer"]["lr"] == "1e-3"  # the trap, as PyYAML has it
    _, cfg = resolve(path, "typed")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.data.val_fraction, cfg.description) == (0.001, 0.0005, 0.25, "no")
    _, cfg = resolve(path, "typed", ["optimizer.lr=5e-2", "optimizer.weight_decay=1E-5", "data.val_fraction=.1", "deterministic=false"])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.data.val_fraction, cfg.deterministic) == (0.05, 1e-5, 0.1, False)


@pytest.mark.parametrize("bad, sets, message", MISTAKES, ids=[m[2].split(":")[0] for m in MISTAKES])
def test_config_mistakes_exit_2_with_named_error_and_nothing_started(tmp_path, capsys, bad, sets, message):
    import ray

    path = write_experiments(tmp_path / "experiments.yaml", {"ok": {}, "bad": bad})
    store = tmp_path / "store" / "mlflow.db"
    argv = ["--config", str(path), "--experiment", "ok" if sets else "bad", "--tracking-uri", f"sqlite:///{store}", "--storage", str(tmp_path / "ray")]
    for s in sets:
        argv += ["--set", s]
    ray_before = ray.is_initialized()
    assert sweep.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not store.parent.exists() and not (tmp_path / "ray").exists()  # no MLflow store, no run, no Ray results
    assert ray.is_initialized() == ray_before  # main() started no Ray


def test_a_key_twice_in_one_mapping_is_refused_with_both_lines(tmp_path):
    """YAML 1.2 requires unique keys; PyYAML's safe_load keeps the last one silently, so a setting typed twice would lose one."""
    path = write_experiments(tmp_path / "e.yaml", {"ok": {"epochs": 2}})
    text = path.read_text().replace("    epochs: 2\n", "    epochs: 2\n    epochs: 3\n")
    path.write_text(text)
    assert yaml.safe_load(text)["experiments"]["ok"]["epochs"] == 3  # the trap, as PyYAML has it
    lines = text.splitlines()
    first = lines.index("    epochs: 2") + 1
    with pytest.raises(ConfigError, match=rf"not valid YAML: duplicate key 'epochs' \(first on line {first}\)[\s\S]*line {first + 1}, column 5"):
        resolve(path, "ok")


def test_a_repeated_value_weighs_a_random_choice_and_is_allowed_there(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"ok": {"num_samples": 4, "grid": {"seed": {"choice": [1, 1, 2]}}}})
    _, cfg = resolve(path, "ok")
    assert len(trial_configs(cfg)) == 4 and {t.seed for t in trial_configs(cfg)} <= {1, 2}


def test_errors_in_another_experiment_block_the_launch(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"ok": {}, "other": {"epochs": -1}})
    with pytest.raises(ConfigError, match="experiments.other.epochs: must be >= 1"):
        resolve(path, "ok")


def test_error_in_defaults_points_at_defaults(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"ok": {}}, defaults={"label_smoothing": 2.0})
    with pytest.raises(ConfigError, match=r"defaults.label_smoothing: must be in \[0, 1\)"):
        resolve(path, "ok")


def test_unknown_experiment_and_broken_yaml(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"ok": {}})
    with pytest.raises(ConfigError, match="--experiment 'nope': no such experiment; known: ok"):
        resolve(path, "nope")
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiments: {ok: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(broken)


def test_nothing_to_resume_or_analyse_exits_2_with_the_reason(tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    path = write_experiments(tmp_path / "e.yaml", {"ok": {}})
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert sweep.main(["--config", str(path), "--experiment", "ok", "--resume", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 2
    assert f"no interrupted sweep of 'ok' under {tmp_path / 'ray'} to resume" in capsys.readouterr().err
    assert analysis_main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    assert f"no MLflow store at {uri}" in capsys.readouterr().err  # nothing was ever logged there: not created by reading


@pytest.mark.parametrize("name", ["it's", "a/b", "../x", ".hidden", "a b"])
def test_experiment_names_that_cannot_be_filters_or_folders_exit_2_before_anything_starts(tmp_path, capsys, name):
    import ray

    path = write_experiments(tmp_path / "e.yaml", {name: {}})
    store = tmp_path / "store" / "mlflow.db"
    ray_before = ray.is_initialized()
    argv = ["--config", str(path), "--experiment", name, "--tracking-uri", f"sqlite:///{store}", "--storage", str(tmp_path / "ray")]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert f"invalid experiment name {name!r}" in err and "letters, digits, '-', '_' and '.', not starting with a dot" in err
    assert not store.parent.exists() and not (tmp_path / "ray").exists() and ray.is_initialized() == ray_before


def test_experiment_names_with_dots_dashes_and_underscores_are_accepted(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"cifar10_v1.2-b": {}})
    assert resolve(path, "cifar10_v1.2-b")[0] == "cifar10_v1.2-b"


def test_paths_in_a_grid_are_made_absolute_like_the_base_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiments(tmp_path / "e.yaml", {"g": {"data": {"name": "imagefolder", "root": "base"},
                                                        "grid": {"data.root": ["a", "~/b"], "data.cache_dir": {"choice": ["c"]}}}})
    _, cfg = resolve(path, "g")
    cfg = absolute_paths(cfg)
    assert cfg.data.root == str(tmp_path / "base")
    assert cfg.grid["data.root"] == [str(tmp_path / "a"), str(Path("~/b").expanduser())]
    assert cfg.grid["data.cache_dir"] == {"choice": [str(tmp_path / "c")]}
