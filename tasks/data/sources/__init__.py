"""Raw sources → canonical rows (``schemas/tables.py``: preference, sft, unpaired) + quarantine rows.

One small module per source format (``hh_rlhf``, ``orca_dpo_pairs``, ``ultrafeedback``,
``ultrafeedback_binarized``, ``generic`` → preference; ``sft`` → sft; ``unpaired`` → unpaired), registered in
``formats.ADAPTERS``; ``readers`` reads
files and hub datasets; ``core.read_source`` runs a recipe source through its adapter.
"""

from tasks.data.sources.base import Adapter, RowError
from tasks.data.sources.core import SourceResult, read_source
from tasks.data.sources.formats import ADAPTERS, get_adapter
from tasks.data.sources.readers import read_records

__all__ = ["ADAPTERS", "Adapter", "RowError", "SourceResult", "get_adapter", "read_records", "read_source"]
