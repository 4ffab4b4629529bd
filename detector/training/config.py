"""The training recipe as one typed config; saved with every run and inside every bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..models import GateConfig


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults are those of the bundled default model.

    Loss weights follow METHOD.md section 2:
    ``L = CE + w_mi * CE(q(path), y) + w_infomax * L_infomax + w_sparsity * mean(p) + w_align * L_align``.
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
    val_size: int = 5000  # held out of the training split, by seed
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
    sparsity_warmup: float = 0.0  # fraction of training over which w_sparsity ramps up from 0
    head_hidden: int = -1  # VGG head width; -1 keeps the architecture's default
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        self.augment = tuple(self.augment)
        choices = {"optimizer": ("adamw", "sgd"), "schedule": ("onecycle", "cosine", "constant"),
                   "mi_input": ("hard", "soft"), "align_distance": ("mse", "bce")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        for a in self.augment:
            if a not in ("hflip", "shift"):
                raise ValueError(f"augment={a!r} must be 'hflip' or 'shift'")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup={self.sparsity_warmup} must be in [0, 1]")

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
