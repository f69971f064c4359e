"""A fake Anthropic Messages API for tests and demos: real HTTP over real sockets, exact token truth.

``FakeAnthropicServer`` answers ``POST /v1/messages`` (and the SDK's beta route) with a response
shaped by a ``ResponseSpec``, breaks it as a ``Fault`` says, and records what every attempt billed
in its ``ledger``. See ``docs/testing.md``.
"""

from __future__ import annotations

from .faults import FAULT_HEADER, DropProfile, Fault, FaultKind, FaultSchedule, ReceivedRequest
from .ledger import Ending, Ledger, LedgerEntry, LedgerTotals
from .server import FakeAnthropicServer
from .spec import DEFAULT_BLOCKS, BlockKind, BlockSpec, ContentType, ResponseSpec, input_tokens_for_body
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_BLOCKS",
    "FAULT_HEADER",
    "BlockKind",
    "BlockSpec",
    "ContentType",
    "DropProfile",
    "Ending",
    "FakeAnthropicServer",
    "Fault",
    "FaultKind",
    "FaultSchedule",
    "Ledger",
    "LedgerEntry",
    "LedgerTotals",
    "ReceivedRequest",
    "ResponseSpec",
    "Tokenizer",
    "input_tokens_for_body",
]
