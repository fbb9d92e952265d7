"""Run configuration: one dataclass, YAML-able, merged as recipe defaults < config file < command-line flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillad.backbones import BACKBONE_NAMES
from distillad.data.images import check_resize_mode
from distillad.errors import ConfigError
from distillad.methods import method_class
from distillad.scoring.calibration import ThresholdRule, check_threshold_settings
from distillad.typed import typed_values

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass
class OptimizerConfig:
    name: str = "adam"                          # adam | sgd
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)   # adam
    momentum: float = 0.9                       # sgd
    weight_decay: float = 0.0
    milestones: tuple[float, ...] = ()          # fractions of the epochs at which lr is multiplied by gamma
    gamma: float = 0.2


@dataclass
class TrainConfig:
    method: str = "dskd"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None                  # local teacher checkpoint (ResNet family); None: default source
    image_size: int = 256
    # how images become the square input: stretch (the field's protocol) | letterbox (aspect kept, the rest filled
    # by mirroring the image); masks and metrics stay in the stretched frame either way (data/images.py)
    resize: str = "stretch"
    epochs: int | None = None                   # None: as many as give about `steps` optimizer steps
    steps: int = 360                            # training length when epochs is None (fits any dataset size)
    min_epochs: int = 1                         # when epochs is None: at least this many passes over a large set
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.1                   # share of train/good held out as defect-free validation
    # calibration from the validation scores: gumbel (a Gumbel law fitted to them, cut where `false_alarm_rate` of
    # defect-free images are expected above) or mean_std (mean + threshold_k * std); see scoring/calibration.py
    threshold_rule: str = "gumbel"
    false_alarm_rate: float = 0.03
    threshold_k: float = 3.0
    cache_teacher: bool = True                  # compute the frozen teacher's features once (no augmentation)
    channels_last: bool = True                  # NHWC tensors: depthwise convolutions train ~1.6x faster on CPU
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    options: dict[str, Any] = field(default_factory=dict)   # method switches, see each method's Options class

    def threshold(self) -> ThresholdRule:
        """The calibration rule these settings describe."""
        return ThresholdRule(self.threshold_rule, self.threshold_k, self.false_alarm_rate)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["optimizer"]["betas"] = list(self.optimizer.betas)
        out["optimizer"]["milestones"] = list(self.optimizer.milestones)
        return out

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The explicit epoch count, or the one closest to `steps` optimizer steps but at least `min_epochs`.

        A fixed step budget alone gives a large training set few passes (360 steps are 30 epochs of 188 images but
        8 of 686); the floor lets a method ask for enough passes however large the set is."""
        if self.epochs is not None:
            return int(self.epochs)
        return max(1, int(self.min_epochs), round(self.steps / max(1, steps_per_epoch)))

    def validate(self) -> None:
        options = method_class(self.method).options_class.from_dict(self.options, source=f"{self.method} options")
        for key in options.legacy_defaults:     # saved explicitly, so the run never passes for one that predates it
            self.options.setdefault(key, getattr(options, key))
        if self.backbone not in BACKBONE_NAMES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
        for name in ("image_size", "epochs", "batch_size", "steps", "min_epochs"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        code_stride = 2 ** (max(options.pyramid_levels()) + 2)      # the embedding's code: twice the deepest stride
        if self.image_size % code_stride:
            raise ConfigError(f"image_size must be a multiple of {code_stride} (the embedding works at stride "
                              f"{code_stride} with levels {list(options.levels)}), got {self.image_size}")
        check_resize_mode(self.resize)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.optimizer.name not in ("adam", "sgd"):
            raise ConfigError(f"optimizer.name must be adam or sgd, got {self.optimizer.name!r}")
        if not self.optimizer.lr > 0 or not self.optimizer.gamma > 0:
            raise ConfigError(f"the learning rate and optimizer.gamma must be > 0, got lr {self.optimizer.lr}, "
                              f"gamma {self.optimizer.gamma}")
        if self.optimizer.weight_decay < 0 or self.optimizer.momentum < 0 or \
                not all(0 <= beta < 1 for beta in self.optimizer.betas):
            raise ConfigError("optimizer.weight_decay and momentum must be >= 0 and betas in [0, 1)")
        if self.threshold_k < 0:
            raise ConfigError(f"threshold_k must be >= 0, got {self.threshold_k}")
        check_threshold_settings(self.threshold_rule, self.false_alarm_rate)
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")


def _merge(config: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Overlay `values` on `config`, every value checked against its declaration (None means "not given")."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    values = typed_values(TrainConfig, {k: v for k, v in values.items() if v is not None}, source)
    for key, value in values.items():
        if key == "optimizer":
            for opt_key, opt_value in typed_values(OptimizerConfig, value, f"{source}: optimizer").items():
                setattr(config.optimizer, opt_key, opt_value)
        elif key == "options":
            config.options.update(value)
        else:
            setattr(config, key, value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def resolve_config(method: str | None = None, file_values: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe defaults for the method, then the config file, then explicit flags (None = not given)."""
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = overrides.get("method") or method or file_values.get("method") or "dskd"
    if not isinstance(chosen, str):
        raise ConfigError(f"method must be a string, got {chosen!r}")
    config = TrainConfig(method=chosen)
    _merge(config, method_class(chosen).recipe, f"{chosen} recipe")
    _merge(config, file_values, "config file")
    _merge(config, overrides, "command line")
    config.method = chosen
    config.validate()
    return config


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config exactly (no defaults merged in)."""
    config = TrainConfig()
    _merge(config, values, "saved config")
    config.validate()
    return config
