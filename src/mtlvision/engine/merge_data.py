"""The data a data-driven merging rule reads (``mtlvision merge --data``).

Fisher merging (Matena & Raffel 2022) and RegMean (Jin et al. 2023) gather their statistics on training
samples, Fisher's from each expert's loss (labels needed), RegMean's from the layers' inputs (images only);
AdaMerging (Yang et al. 2024) minimises prediction entropy on unlabelled test images. By default each rule
reads the experts' own data; ``--data`` names other data (a preset or a YAML file, as ``train`` takes), whose
split the rule reads is checked to exist, to hold images the experts take, and for a rule that needs them to
carry every task's labels. The merged run records what was read (``merge.data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from mtlvision.config import RunConfig
from mtlvision.data.collate import Collate
from mtlvision.engine.build import build_split, open_split
from mtlvision.engine.merging import MERGE_RULES, DataUse, MergeRule, make_rule
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.models import MultiTaskModel

EXPERTS_DATA = "the experts' data"


@dataclass(frozen=True)
class MergeData:
    """Where a rule's samples come from: ``config`` (the given data's configuration) or, when None, the
    experts' own data; ``use`` is the split the rule reads and whether it needs labels."""

    use: DataUse
    config: RunConfig | None = None
    source: str = EXPERTS_DATA

    def reading(self, config: RunConfig) -> RunConfig:
        """``config`` (an expert's or the merged model's) with its data replaced by the given data, if any."""
        return config if self.config is None else config.model_copy(update={"data": self.config.data})

    def loader(self, config: RunConfig, model: MultiTaskModel) -> DataLoader:
        """The rule's split as evaluation reads it (no augmentation, in order): with ``model``'s labels when the
        rule needs them, else the images alone (no label is read)."""
        config = self.reading(config)
        tasks = list(model.tasks.values()) if self.use.labels else []
        data = build_split(config, tasks, self.use.split, train=False)
        return DataLoader(data, batch_size=config.train.batch_size, collate_fn=Collate({t.name: t for t in tasks}))

    def record(self) -> dict[str, Any]:
        """What the merged run's report says was read."""
        dataset = "each expert's own" if self.config is None else self.config.data.name
        return {
            "source": self.source,
            "dataset": dataset,
            "split": self.use.split,
            "labels": self.use.labels,
        }


def rules_reading_data() -> list[str]:
    """The registered rules that read data with their default hyper-parameters (for error messages)."""
    return [name for name in MERGE_RULES.names() if make_rule(name).data_use() is not None]


def merge_data(
    rule: MergeRule, name: str, merged: RunConfig, data: RunConfig | None = None, source: str | None = None
) -> MergeData | None:
    """The data ``rule`` (registered as ``name``) reads, checked; None for a rule that reads none.

    Args:
        rule: the configured rule; name: its registry name.
        merged: the merged run's configuration (the experts' data and every task).
        data: other data to read (its ``data`` section is used), or None for the experts' own.
        source: how the user named ``data`` (a preset or file), for messages and the record.

    Returns:
        The data, or None when the rule reads none. Raises ConfigError for ``data`` given to a rule that reads
        none, a split the data lacks or holds no sample of, images of another channel count than the experts'
        data, or, for a rule that needs labels, a task the data has no labels for.
    """
    use = rule.data_use()
    label = source or (data.data.name if data is not None else EXPERTS_DATA)
    if use is None:
        if data is not None:
            raise ConfigError(
                f"--data {label}: merging rule {name!r} combines the experts' weights alone and reads no data; "
                f"--data is for the rules that do ({', '.join(rules_reading_data())})"
            )
        return None
    if data is None:
        return MergeData(use)
    chosen = MergeData(use, data, label)
    given = _first_sample(chosen.reading(merged), use.split, f"--data {label}")
    if use.labels:
        missing = [entry.name for entry in merged.tasks or [] if entry.name not in given["targets"]]
        if missing:
            raise ConfigError(
                f"--data {label}: its {use.split} split has no labels for task(s) {', '.join(missing)}; merging "
                f"rule {name!r} needs every task's labels (it reads each expert's loss)"
            )
    own = _first_sample(merged, "train", "the experts' data")
    if given["image"].shape[0] != own["image"].shape[0]:
        raise ConfigError(
            f"--data {label}: its images have {given['image'].shape[0]} channel(s), the experts' "
            f"{own['image'].shape[0]}"
        )
    return chosen


def _first_sample(config: RunConfig, split: str, where: str) -> dict[str, Any]:
    """The first sample of ``split`` as a rule reads it (transformed, every target the dataset stores kept)."""
    try:
        stored = open_split(config, split)
        empty = len(stored) == 0  # type: ignore[arg-type]  # map-style datasets define __len__
        sample = None if empty else build_split(config, [], split, train=False)[0]
    except MtlvisionError as error:
        raise ConfigError(f"{where}: cannot read its {split} split: {error}") from None
    if sample is None:
        raise ConfigError(f"{where}: its {split} split holds no sample")
    return {"image": sample["image"], "targets": stored[0]["targets"]}
