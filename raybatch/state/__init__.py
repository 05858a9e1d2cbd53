"""The server's single source of truth: jobs, attempts, ranks and every state
transition, in one SQLite file (WAL)."""

from raybatch.state.states import AttemptOutcome, JobState, InvalidTransition
from raybatch.state.store import Store

__all__ = ["AttemptOutcome", "JobState", "InvalidTransition", "Store"]
