"""The training recipe as one typed config; saved with every run and inside every bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..models import GateConfig


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults are those of the bundled default model.

    Loss weights follow METHOD.md section 2:
    ``L = (1 - distill) * CE + distill * KD + distill_features * H
    + r(t) * (w_mi * CE(q(path), y) + w_infomax * L_infomax + w_sparsity * mean(p)
    + w_flops * (flops - target_flops)^2 + w_align * L_align)``,
    where ``r(t)`` ramps every auxiliary term in together over the first ``aux_warmup`` of training
    and KD and H (the feature hint) are the distillation terms of a run initialised from a dense bundle
    (``init_from``).
    The new fields default to the recipe of the bundled default model (no FLOPs target, max-normalised
    alignment, no ramp), so an old bundle's ``train_config`` still means what it meant.
    """

    arch: str = "vgg8"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    gated: bool = True  # False trains the dense twin with the same recipe
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 4e-3  # peak learning rate of the schedule
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    augment: tuple[str, ...] = ("hflip", "shift")  # hflip: mirror; shift: random translation
    shift: int = 2  # pixels, for the shift augmentation
    val_size: int = 5000  # held out of the training split, by seed (a continued run keeps its start's split)
    train_subset: int = 0  # >0: train on this many images only (quick runs, tests)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: the CPUs this process may use
    # loss (METHOD.md section 2); the weights are ignored for the dense twin
    w_mi: float = 0.5  # variational MI: CE of the path head q(y | path)
    w_infomax: float = 0.1  # InfoMax per gate: -(H(mean p) - mean H(p))
    w_sparsity: float = 0.05  # mean soft gate (L1 on the encoding)
    w_align: float = 0.5  # distance between the layer's own encoding e and p
    mi_input: str = "hard"  # path fed to q: "hard" (straight-through) or "soft"
    align_distance: str = "mse"  # mse | bce
    sparsity_warmup: float = 0.0  # fraction of training over which w_sparsity alone ramps up from 0 (legacy)
    # density you can ask for: executed FLOPs relative to the dense twin, as the bundle reports them
    target_flops: float = field(
        default=0.0,
        metadata={
            "help": "executed-FLOPs ratio to train towards, e.g. 0.25 (controlling modules included; 0: no target)"
        },
    )
    w_flops: float = field(default=20.0, metadata={"help": "weight of (flops_ratio - target_flops)^2"})
    align_mode: str = field(
        default="max",
        metadata={
            "help": "max: MSE to e / max e (first recipe); onesided: only switched-off filters must be silent; "
            "rescaled: e rescaled to the density sqrt(target_flops) implies"
        },
    )
    aux_warmup: float = field(
        default=0.0,
        metadata={"help": "fraction of training over which every auxiliary loss term ramps up from 0, together"},
    )
    # decoupling a trained dense model (pathguard decouple)
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "dense bundle of the same arch whose weights start the run: gated, every gate on (decoupling); "
            "dense, continued training (the dense twin of a decoupled model)"
        },
    )
    distill: float = field(
        default=0.0, metadata={"help": "weight of distillation from the init_from model (CE gets 1 - distill)"}
    )
    distill_temperature: float = field(default=4.0, metadata={"help": "temperature T of the distillation KL"})
    distill_features: float = field(
        default=0.0,
        metadata={
            "help": "weight of the feature hint: squared distance between the student's and the init_from "
            "model's penultimate features, relative to the teacher's (0: off)"
        },
    )
    freeze_gates_epochs: int = field(
        default=0, metadata={"help": "the last N epochs train with the controlling modules frozen"}
    )
    # adversarial fine-tuning (detector/training/adversarial.py)
    adversarial_eps: float = field(
        default=0.0,
        metadata={"help": "Linf budget in [0, 1] pixels of the adversarial examples mixed into each batch (0: off)"},
    )
    adversarial_steps: int = field(
        default=1, metadata={"help": "1: FGSM with random start (step 1.25 eps); k > 1: PGD, k steps of 2.5 eps / k"}
    )
    adversarial_fraction: float = field(
        default=0.5, metadata={"help": "share of each batch replaced by its adversarial examples (the rest clean)"}
    )
    head_hidden: int = -1  # VGG head width; -1 keeps the architecture's default
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        self.augment = tuple(self.augment)
        self._check_choices()
        self._check_ranges()
        self._check_weights()

    def _check_choices(self) -> None:
        choices = {
            "optimizer": ("adamw", "sgd"),
            "schedule": ("onecycle", "cosine", "constant"),
            "mi_input": ("hard", "soft"),
            "align_distance": ("mse", "bce"),
            "align_mode": ("max", "onesided", "rescaled"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        for a in self.augment:
            if a not in ("hflip", "shift"):
                raise ValueError(f"augment={a!r} must be 'hflip' or 'shift'")
        for name in ("distill", "distill_features"):
            if getattr(self, name) > 0 and not self.init_from:
                raise ValueError(f"{name} > 0 needs a teacher: set init_from to a dense bundle")

    def _check_ranges(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        for name in ("sparsity_warmup", "aux_warmup", "distill"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0 <= self.target_flops <= 1:
            raise ValueError(f"target_flops={self.target_flops} must be in (0, 1], or 0 for no target")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature={self.distill_temperature} must be > 0")
        if not 0 <= self.adversarial_eps <= 1:
            raise ValueError(f"adversarial_eps={self.adversarial_eps} must be in [0, 1] (Linf, [0, 1] pixels; 0: off)")
        if self.adversarial_steps < 1:
            raise ValueError(f"adversarial_steps={self.adversarial_steps} must be >= 1 (1: FGSM with random start)")
        if not 0 < self.adversarial_fraction <= 1:
            raise ValueError(f"adversarial_fraction={self.adversarial_fraction} must be in (0, 1]")
        if not 0 <= self.freeze_gates_epochs < self.epochs:
            raise ValueError(f"freeze_gates_epochs={self.freeze_gates_epochs} must be in [0, epochs)")

    def _check_weights(self) -> None:
        for name in ("w_mi", "w_infomax", "w_sparsity", "w_align", "w_flops", "distill_features"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (a loss weight; 0 turns the term off)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = list(self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)
