"""`pathguard`: one parser for every command, flags and PATHGUARD_* variables from the same typed configs."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from detector.adaptive.experiment import AdaptiveConfig
from detector.evaluation.config import EvalConfig
from detector.fitting import FitConfig
from detector.interpret.explainer import ExplainConfig
from detector.training.config import TrainConfig
from pathguard.main import build_parser, main
from pathguard.options import config_from
from service.config import ScreenConfig, ServeConfig

# Every flag each subcommand had before the command line moved into pathguard/ (issue 17): deployments,
# scripts and docs use them, so none may disappear or be renamed.
FLAGS_BEFORE = {
    "train": (
        "--align-distance --arch --augment --batch-size --config --data-root --dataset --device "
        "--epochs --gate-init-bias --gate-min-hidden --gate-noise --gate-noise-scale "
        "--gate-reduction --gate-temperature --gated --head-hidden --lr --mi-input --optimizer "
        "--out --quiet --schedule --seed --shift --sparsity-warmup --threads --train-subset "
        "--val-size --w-align --w-infomax --w-mi --w-sparsity --weight-decay"
    ).split(),
    "info": ("--json").split(),
    "data fetch": ("--data-root").split(),
    "explain": (
        "--attack-file --bundle --data-root --image-files --images --indices --out "
        "--prototype-images --seed --split --threshold"
    ).split(),
    "attack": ("--attack --batch-size --bundle --c --data-root --eps --n --out --quiet --seed --split --steps").split(),
    "fit-detector": (
        "--attacks --bundle --cache-dir --classifier --data-root --features --n-calibration --n-fit "
        "--quiet --seed --target-fpr"
    ).split(),
    "evaluate merge": (
        "--ablation --attacks --batch-size --bundle --cache-dir --data-root --detectors --json "
        "--leave-one-out --n --n-calibration --n-fit --n-reference --out --plots --quiet --seed "
        "--target-fpr"
    ).split(),
    "evaluate": (
        "--ablation --attacks --batch-size --bundle --cache-dir --data-root --detectors --json "
        "--leave-one-out --n --n-calibration --n-fit --n-reference --out --plots --quiet --seed "
        "--shard --target-fpr"
    ).split(),
    "adaptive": (
        "--attacks --batch-size --bundle --cache-dir --check-steps --classifier-loss --data-root --device --eps "
        "--harden --json --kappa --lambdas --mimicry-target --modes --n --n-harden --no-balance --no-plots "
        "--no-transfer --out --quick --quiet --restarts --save-hardened --seed --start-radius --steps --surrogate "
        "--threads"
    ).split(),
    "serve": (
        "--auth-token-file --bundle --engine --grace-period --host --max-batch-size "
        "--max-images-per-request --max-message-mb --max-queue-delay-ms --max-queue-size "
        "--metrics-port --port --threads --tls-cert --tls-client-ca --tls-key"
    ).split(),
    "screen": ("--client-cert --client-key --json --target --timeout --tls-ca --token-file --top-k").split(),
}


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[prefix + name] = sub
                out.update(_subparsers(sub, prefix + name + " "))
    return out


def test_every_earlier_flag_still_exists():
    subs = _subparsers(build_parser())
    for command, flags in FLAGS_BEFORE.items():
        have = {s for a in subs[command]._actions for s in a.option_strings}
        assert set(flags) <= have, (command, sorted(set(flags) - have))


@pytest.mark.parametrize(
    "command, cls, field, flag, env_value, expected",
    [
        (["train", "--out", "x"], TrainConfig, "epochs", "--epochs", "7", 7),
        (["train", "--out", "x"], TrainConfig, "gate", "--gate-init-bias", "0.25", 0.25),
        (["evaluate"], EvalConfig, "n", "--n", "9", 9),
        (["fit-detector"], FitConfig, "classifier", "--classifier", "rf", "rf"),
        (["adaptive", "--out", "x"], AdaptiveConfig, "eps", "--eps", "0.2,0.3", (0.2, 0.3)),
        (["explain", "--out", "x"], ExplainConfig, "indices", "--indices", "1,2", (1, 2)),
        (["serve"], ServeConfig, "max_batch_size", "--max-batch-size", "8", 8),
        (["screen", "a.png"], ScreenConfig, "top_k", "--top-k", "3", 3),
    ],
)
def test_each_command_reads_flag_then_env_then_default(command, cls, field, flag, env_value, expected):
    env_name = "PATHGUARD_" + flag[2:].replace("-", "_").upper()
    parser = build_parser()
    from_env = config_from(cls, parser.parse_args(command), {env_name: env_value})
    value = getattr(from_env, field)
    assert (value.init_bias if field == "gate" else value) == expected
    default = config_from(cls, parser.parse_args(command), {})
    assert getattr(default, field) == getattr(cls(), field) if field != "gate" else True
    other = "1" if flag != "--classifier" else "gb"
    flagged = config_from(cls, parser.parse_args([*command, flag, other]), {env_name: env_value})
    value = getattr(flagged, field)
    assert str(value.init_bias if field == "gate" else value).strip("(),") in (other, "1.0")


def test_switches_and_negated_switches():
    args = build_parser().parse_args(["adaptive", "--out", "x", "--harden", "--no-transfer", "--quiet"])
    assert config_from(AdaptiveConfig, args, {}).harden is True
    assert config_from(AdaptiveConfig, args, {}).transfer is False
    assert config_from(AdaptiveConfig, args, {}).balance is True
    assert config_from(AdaptiveConfig, args, {"PATHGUARD_BALANCE": "false"}).balance is False


def test_adaptive_uses_pathguard_bundle(tmp_path, monkeypatch, capsys):
    """The bug of issue 17: `pathguard adaptive` ignored PATHGUARD_BUNDLE and used the repository's bundle."""
    monkeypatch.setenv("PATHGUARD_BUNDLE", str(tmp_path / "elsewhere"))
    assert main(["adaptive", "--out", str(tmp_path / "out"), "--n", "1", "--quiet"]) == 2
    assert str(tmp_path / "elsewhere") in capsys.readouterr().err


def test_malformed_environment_is_named():
    with pytest.raises(ValueError, match="PATHGUARD_N='many'"):
        config_from(EvalConfig, build_parser().parse_args(["evaluate"]), {"PATHGUARD_N": "many"})


def test_python_dash_m_pathguard_is_the_console_script():
    out = subprocess.run([sys.executable, "-m", "pathguard", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit-detector" in out.stdout and "serve" in out.stdout
