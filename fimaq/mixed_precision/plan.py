"""The bit plan: layer name -> weight/activation bits, with the model and budget it was made for."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fimaq.errors import FimaqError, one_line
from fimaq.files import atomic_write_bytes
from fimaq.quant.quantizer import check_bits

PLAN_VERSION = 1


@dataclass
class BitPlan:
    """A mixed-precision allocation.

    Attributes:
        arch: the timm model name the plan was made for.
        model_kwargs: its ``timm.create_model`` overrides.
        budget: the average weight bits the plan had to meet.
        layers: ``{layer name: {"w_bits": b, "a_bits": b}}``.
        sensitivity: ``{layer name: Omega}`` of the last round.
        average_w_bits: the size-weighted average weight bits the plan reaches.
        rounds: the allocations of every round (layer name -> weight bits).
    """

    arch: str
    model_kwargs: dict[str, Any]
    budget: float
    layers: dict[str, dict[str, int | None]]
    sensitivity: dict[str, float] = field(default_factory=dict)
    average_w_bits: float = 0.0
    rounds: list[dict[str, int]] = field(default_factory=list)

    def overrides(self) -> dict[str, dict[str, int | None]]:
        """The plan as ``QuantSpec.overrides``."""
        return {name: dict(bits) for name, bits in self.layers.items()}

    def check_model(self, arch: str, model_kwargs: dict[str, Any], path: str | Path = "the bit plan") -> None:
        """Refuse a plan made for another model."""
        if self.arch != arch or dict(self.model_kwargs) != dict(model_kwargs):
            raise FimaqError(
                f"{path} was made for {self.arch} {self.model_kwargs}, not {arch} {dict(model_kwargs)}"
            )

    def save(self, path: str | Path) -> Path:
        """Write the plan as YAML (atomically)."""
        data = {"fimaq_bit_plan": PLAN_VERSION, **asdict(self)}
        text = yaml.safe_dump(data, sort_keys=False)
        path = Path(path)
        atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
        return path

    def check_layers(self, names: Iterable[str], path: str | Path = "the bit plan") -> None:
        """Refuse a plan naming layers the model does not have (``names``: its quantized layers)."""
        known = set(names)
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            more = ", ..." if len(unknown) > 3 else ""
            raise FimaqError(
                f"{path} names {len(unknown)} layer(s) this {self.arch} does not have: "
                f"{', '.join(unknown[:3])}{more}"
            )

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        """Read a plan written by :meth:`save`; its fields and every bit-width are checked.

        Raises:
            FimaqError: the file is missing, not YAML, truncated, not a bit plan of this version, or
                holds a field of the wrong type or a bit-width outside 2..8 (32/null: FP).
        """
        path = Path(path)
        if not path.is_file():
            raise FimaqError(f"bit plan not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or one_line(exc)
            raise FimaqError(f"bit plan {path} is not valid YAML: {problem}{where}") from None
        except (OSError, ValueError) as exc:  # unreadable, or not text
            raise FimaqError(f"cannot read bit plan {path}: {one_line(exc)}") from None
        if not isinstance(data, dict) or data.get("fimaq_bit_plan") != PLAN_VERSION:
            raise FimaqError(f"{path} is not a fimaq bit plan (version {PLAN_VERSION})")
        data.pop("fimaq_bit_plan")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:  # save() writes every field: a missing one means a cut-off file
            raise FimaqError(f"{path} is an incomplete bit plan (truncated?): missing {', '.join(missing)}")
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise FimaqError(f"{path} has unknown bit plan field(s): {', '.join(unknown)}")
        plan = cls(**data)
        plan._check_fields(path)
        return plan

    def _check_fields(self, path: Path) -> None:
        def bad(field_name: str, want: str, value: Any) -> FimaqError:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            return FimaqError(
                f"{path}: {field_name} must be {want}, got {shown} (truncated or edited by hand?)"
            )

        if not isinstance(self.arch, str) or not self.arch:
            raise bad("arch", "a timm model name", self.arch)
        if not isinstance(self.model_kwargs, dict):
            raise bad("model_kwargs", "a mapping", self.model_kwargs)
        for name in ("budget", "average_w_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number", value)
        if not isinstance(self.layers, dict) or not self.layers:
            raise bad("layers", "a non-empty mapping of layer name -> bits", self.layers)
        for name, bits in self.layers.items():
            if not isinstance(bits, dict):
                raise bad(f"layers.{name}", "a mapping with w_bits/a_bits", bits)
            for key, value in bits.items():
                if key not in ("w_bits", "a_bits"):
                    raise FimaqError(f"{path}: layer {name} has an unknown key {key!r}")
                check_bits(value, f"{path}: {name}.{key}")
        if not isinstance(self.sensitivity, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.sensitivity.values()
        ):
            raise bad("sensitivity", "a mapping of layer name -> number", self.sensitivity)
        if not isinstance(self.rounds, list) or not all(isinstance(r, dict) for r in self.rounds):
            raise bad("rounds", "a list of mappings", self.rounds)


def plot_plan(plan: BitPlan, path: str | Path):
    """Bar chart of the weight bits per layer, sensitivity on a second (log) axis; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.layers)
    bits = [plan.layers[n].get("w_bits") or 32 for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.0))
    ax.bar(range(len(names)), bits, color="tab:blue", label="weight bits")
    ax.set_ylabel("weight bits")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.axhline(plan.budget, color="gray", ls="--", lw=1, label=f"budget {plan.budget:g}")
    if plan.sensitivity:
        ax2 = ax.twinx()
        ax2.plot(
            range(len(names)),
            [max(plan.sensitivity.get(n, 0.0), 1e-12) for n in names],
            "o-",
            color="tab:red",
            ms=3,
        )
        ax2.set_yscale("log")
        ax2.set_ylabel("sensitivity (type-normalised Fisher trace)", color="tab:red")
    ax.set_title(f"{plan.arch}: average {plan.average_w_bits:.3g} weight bits")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig
