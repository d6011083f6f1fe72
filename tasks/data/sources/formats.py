"""The one explicit table of source formats (keys = ``schemas.data_config.SourceFormat``; a test keeps them equal)."""

from __future__ import annotations

from tasks.data.sources import generic, hh_rlhf, orca_dpo_pairs, sft, ultrafeedback, ultrafeedback_binarized, unpaired
from tasks.data.sources.base import Adapter

ADAPTERS: dict[str, Adapter] = {
    "hh-rlhf": Adapter("hh-rlhf", hh_rlhf.parse, parse_columns=hh_rlhf.parse_columns, fields=("chosen", "rejected")),
    "orca_dpo_pairs": Adapter("orca_dpo_pairs", orca_dpo_pairs.parse),
    "ultrafeedback": Adapter("ultrafeedback", ultrafeedback.parse, needs_rng=True),
    "ultrafeedback_binarized": Adapter("ultrafeedback_binarized", ultrafeedback_binarized.parse),
    "generic": Adapter("generic", generic.parse),
    "sft": Adapter("sft", sft.parse, table="sft"),
    "unpaired": Adapter("unpaired", unpaired.parse, table="unpaired"),
}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown source format {name!r}; valid formats: {', '.join(ADAPTERS)}") from None
