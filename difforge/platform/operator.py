"""The operator contract.

An operator has a registered `name`, a `version` (bumped whenever its results would change), a
pydantic `Params` model with extra fields forbidden, `resources`, and says in `columns()` which
columns it reads and writes. Shapes of work:

- `SourceOperator`: no inputs; lists read tasks on the driver, reads each on a worker.
- `MapOperator`: an Arrow batch in, an Arrow batch out (`process`), run by Ray Data as plain
  tasks.
- `ModelMap`: a map that holds a model: `load(ctx)` once per actor of an actor pool, then
  `process(batch)`; the model is `self.model`.
- `FilterOperator`: a map that keeps or rejects each row with a reason.
- `JobOperator`: a whole dataset in, artifacts out, run as one job (for example Ray Train).
- `DedupOperator` (in `difforge.platform.dedup`): a job that finds rows duplicating others
  across the whole dataset (or a reference) from keys and a match rule, and drops or flags them.

Operator modules import heavy libraries (torch, Ray) inside methods, never at module level, so
that `difforge validate` stays fast.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from difforge.platform.outputs import MAIN as MAIN  # re-exported: operators import it from here
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext, JobContext, MapContext


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Columns:
    """The columns a step reads and writes, as its operator's `columns()` declares them.

    - `reads`: what its main input must have (checked at planning, types at the first batch);
    - `writes`: the columns it adds to (or rewrites in) its main input's; None: known only
      once it runs;
    - `drops`: columns it removes from its main input's;
    - `keeps_input`: False where the main output is `writes` alone, not the input's columns
      (a model's one row, an evaluation's figures; a source's output always is);
    - `renames`: {column: new name} for an input column it keeps under another name where the
      input has it (a caption it replaces, kept as the original);
    - `sides`: the columns of each side output it names (the others: known once it runs).
    """

    reads: Collection[str] = ()
    writes: Collection[str] | None = None
    drops: Collection[str] = ()
    keeps_input: bool = True
    renames: Mapping[str, str] = field(default_factory=dict)
    sides: Mapping[str, Collection[str]] = field(default_factory=dict)


@dataclass
class StepOutcome:
    """What a step produced, before its main output is committed (for `Operator.finalize`)."""

    rows_in: int | None
    rows_out: int
    main_files: list[str]  # URIs of the main output's shards (not yet committed)
    sides: dict[str, Any]  # committed side outputs: name -> Dataset

    def read_main(self, columns: list[str] | None = None) -> pa.Table:
        """The whole main output (mind its size: `iter_main` reads a shard at a time)."""
        import pyarrow as pa

        tables = list(self.iter_main(columns))
        return pa.concat_tables(tables) if tables else None

    def column_names(self) -> list[str]:
        """The main output's columns (its first shard's schema; none without shards)."""
        if not self.main_files:
            return []
        import pyarrow.parquet as pq

        from difforge.platform.datasets import url_to_fs

        fs, path = url_to_fs(self.main_files[0])
        return pq.read_schema(path, filesystem=fs).names

    def iter_main(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The main output's shards, one table at a time."""
        for uri in self.main_files:
            yield self.read_file(uri, columns)

    @staticmethod
    def read_file(uri: str, columns: list[str] | None = None) -> pa.Table:
        """One of `main_files`, only these columns."""
        import pyarrow.parquet as pq

        from difforge.platform.datasets import url_to_fs

        fs, path = url_to_fs(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)


def passthrough(input_columns: list[set[str] | None], add=(), remove=()) -> set[str] | None:
    """The main input's columns, less `remove`, plus `add`; unknown if the input's are."""
    if not input_columns or input_columns[0] is None:
        return None
    return (set(input_columns[0]) - set(remove)) | set(add)


#: the contract's former spellings, honoured for one more release with a DeprecationWarning
LEGACY = {
    "reads": "columns() returning Columns(reads=...)",
    "writes": "columns() returning Columns(writes=...)",
    "required_columns": "columns() returning Columns(reads=...)",
    "output_columns": "columns() returning Columns(writes=..., drops=...)",
    "side_output_columns": "columns() returning Columns(sides=...)",
    "output_metadata": "metadata(inputs)",
}
_COLUMNS_OF_OLD = ("reads", "writes", "required_columns", "output_columns", "side_output_columns")


class Operator:
    """Base of every operator. Subclass one of the shapes below."""

    name: ClassVar[str]
    #: the shape of its work (source, map, job), shown by `difforge ops`
    kind: ClassVar[str] = "operator"
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = NoParams
    resources: ClassVar[Resources] = Resources()
    #: names of side outputs beside the main one, e.g. ("rejects",)
    side_outputs: ClassVar[tuple[str, ...]] = ()
    #: how many inputs the operator takes (min, max)
    inputs: ClassVar[tuple[int, int]] = (1, 1)
    #: may use GPUs when `num_gpus: auto` finds them; the fraction it asks for then
    gpus_when_available: ClassVar[float] = 0.0
    #: the MLflow metrics of its runs that `difforge report` tabulates and plots
    report_metrics: ClassVar[tuple[str, ...]] = ()
    #: what its rows are, naming the step's rate metric `<rows_are>_per_s` (a sampler's rows
    #: are samples); rows_per_s is logged as well
    rows_are: ClassVar[str] = "rows"
    #: declares its columns the former way (reads, writes, required_columns, ...)
    _old_columns: ClassVar[bool] = False
    _old_metadata: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = [n for n in LEGACY if n in vars(cls)]
        if "metadata" in vars(cls) and len(inspect.signature(cls.metadata).parameters) == 1:
            old.append("metadata")  # metadata(self): inputs not taken
        if old:
            instead = "; ".join(f"{n}: {LEGACY.get(n, 'metadata(inputs)')}" for n in old)
            warnings.warn(
                f"operator {cls.__module__}.{cls.__qualname__} uses the former contract "
                f"({instead}); it works until difforge 0.3",
                DeprecationWarning,
                stacklevel=2,
            )
        cls._old_columns = cls._old_columns or any(n in vars(cls) for n in _COLUMNS_OF_OLD)
        cls._old_metadata = cls._old_metadata or any(
            n in old for n in ("metadata", "output_metadata")
        )

    def __init__(self, params: BaseModel):
        self.params = params

    def columns(self) -> Columns:
        """The columns it reads and writes, which may depend on `self.params`."""
        return Columns()

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        """Entries for the output manifest's `metadata`, merged over the main input's; `inputs`
        are the input datasets (`Dataset`), for what depends on them."""
        return {}

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float] | None:
        """After the work, before the commit: return metrics, log images or files to `ctx.log`, or
        raise DifforgeError to refuse the result (the main output is then never committed)."""
        return None

    def external_state(self) -> Any:
        """What this step reads from outside the pipeline (a pretrained model, say), pinned now,
        at plan time, as JSON: it enters the step's fingerprint, so that changed weights are a
        cache miss. Source operators have `source_fingerprint` for their data instead."""
        return None

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    # The former spellings' defaults, for operators that still declare columns that way.
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def required_columns(cls, params: BaseModel) -> set[str]:
        return set(cls.reads)

    @classmethod
    def output_columns(
        cls, params: BaseModel, input_columns: list[set[str] | None]
    ) -> set[str] | None:
        if issubclass(cls, SourceOperator):
            return set(cls.writes)
        return passthrough(input_columns, add=cls.writes)

    @classmethod
    def side_output_columns(cls, params: BaseModel, name: str) -> set[str] | None:
        return None


def required_columns(op: Operator) -> set[str]:
    """The columns `op`'s main input must have."""
    if op._old_columns:
        return set(type(op).required_columns(op.params))
    return set(op.columns().reads)


def output_columns(op: Operator, input_columns: list[set[str] | None]) -> set[str] | None:
    """The columns of `op`'s main output, given its inputs' (None: known once it runs)."""
    if op._old_columns:
        return type(op).output_columns(op.params, input_columns)
    declared = op.columns()
    if declared.writes is None:
        return None
    if isinstance(op, SourceOperator) or not declared.keeps_input:
        return set(declared.writes)
    out = passthrough(input_columns, add=declared.writes, remove=declared.drops)
    if out is not None:
        out |= {new for old, new in declared.renames.items() if old in input_columns[0]}
    return out


def side_output_columns(op: Operator, name: str) -> set[str] | None:
    """The columns of `op`'s side output `name` (None: known once it runs)."""
    if op._old_columns:
        return type(op).side_output_columns(op.params, name)
    found = op.columns().sides.get(name)
    return None if found is None else set(found)


def output_metadata(op: Operator, inputs: list[Any]) -> dict[str, Any]:
    """What `op` adds to its output manifest's metadata."""
    if not op._old_metadata:
        return op.metadata(inputs)
    if "output_metadata" in _defined_below(type(op)):
        return op.output_metadata(inputs)
    return op.metadata()


def columns_by_default(op_cls: type[Operator]) -> tuple[list[str], list[str] | None] | None:
    """(reads, writes) of `op_cls` at its default params, sorted, for its documentation (None
    where its params have no defaults; writes None: known once it runs)."""
    if op_cls._old_columns:
        return sorted(op_cls.reads), sorted(op_cls.writes)
    try:  # the defaults; params with none are unset (a columns() that needs them: None)
        declared = op_cls(op_cls.Params.model_construct()).columns()
    except Exception:  # noqa: BLE001 - columns() that needs a param with no default
        return None
    writes = None if declared.writes is None else sorted(declared.writes)
    return sorted(declared.reads), writes


def _defined_below(cls: type) -> set[str]:
    """Names defined by `cls` and its bases up to (not including) this module's."""
    return {n for k in cls.__mro__ if k.__module__ != __name__ for n in vars(k)}


class SourceOperator(Operator):
    """Reads external data. Fingerprints what it reads so changed data is never served stale."""

    kind: ClassVar[str] = "source"

    inputs: ClassVar[tuple[int, int]] = (0, 0)

    def source_fingerprint(self) -> str:
        """A digest of what would be read (file listing with sizes and times, or ETags)."""
        raise NotImplementedError

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        """Small JSON-able descriptions of independent pieces of work (run on the driver)."""
        raise NotImplementedError

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        """Read one task's rows (run on a worker)."""
        raise NotImplementedError


class MapOperator(Operator):
    """Arrow batch in, Arrow batch (and side outputs) out. Must be retry-safe."""

    kind: ClassVar[str] = "map"

    #: holds a model: run as an actor pool and call `setup` once per actor
    stateful: ClassVar[bool] = False
    #: expensive per row (sampling): each input shard's output is kept in the work folder as
    #: soon as it is written, so a rerun after a crash redoes only the missing shards
    resumable: ClassVar[bool] = False
    #: its `setup` reads its main input as a whole (`ctx.input(0)`): it never shares a pass
    #: with the step before it, whose output must be committed first
    reads_whole_input: ClassVar[bool] = False

    def setup(self, ctx: MapContext) -> None:
        """Load models or other state; called once per actor (once per task when stateless)."""

    def process(self, batch: pa.Table) -> pa.Table | dict[str, pa.Table]:
        """Transform a batch; return the main table, or {"main": ..., "rejects": ...}."""
        raise NotImplementedError


class ModelMap(MapOperator):
    """A map that holds a model: run as an actor pool, `load` builds the model once per actor
    (it is then `self.model`), and `process` uses it on each batch. A plugin's whole contract
    is `name`, `Params`, `columns`, `load` and `process` (and `version`, bumped when what it
    writes changes)."""

    stateful: ClassVar[bool] = True
    model: Any = None

    def load(self, ctx: MapContext) -> Any:
        """The model (any object), built once per actor: read its weights, move them to the
        actor's device (`ctx.torch_device()`)."""
        raise NotImplementedError

    def setup(self, ctx: MapContext) -> None:
        self.model = self.load(ctx)


@dataclass
class Verdicts:
    """A filter's judgement of a batch, row by row."""

    #: per row: None to keep it, else the reason it is rejected (a short, stable word)
    reasons: list[str | None]
    #: per row, optional: a longer explanation kept beside the reason in `rejects`
    details: list[str | None] | None = None
    #: new values for columns of the kept rows, in their order (an image re-encoded, ...)
    replace: dict[str, Any] | None = None


class FilterOperator(MapOperator):
    """Keeps or rejects each row with a reason. `judge` decides; the split into the main output
    and `rejects` (the rejected rows as they came, plus `reason`, and `detail` where given) is
    written once, here, and one bad row never fails the step."""

    kind: ClassVar[str] = "filter"
    side_outputs: ClassVar[tuple[str, ...]] = ("rejects",)

    def judge(self, batch: pa.Table) -> Verdicts:
        raise NotImplementedError

    def process(self, batch: pa.Table) -> dict[str, pa.Table]:
        import pyarrow as pa
        import pyarrow.compute as pc

        from difforge.platform import columns as C
        from difforge.platform.imaging import replace_columns

        v = self.judge(batch)
        if len(v.reasons) != batch.num_rows:
            raise ValueError(
                f"{self.name}: judge gave {len(v.reasons)} verdicts for {batch.num_rows} rows"
            )
        keep = pa.array([r is None for r in v.reasons], pa.bool_())
        kept = batch.filter(keep)
        if v.replace:
            kept = replace_columns(kept, v.replace)
        rejects = batch.filter(pc.invert(keep))
        reasons = [r for r in v.reasons if r is not None]
        rejects = rejects.append_column(C.REASON, pa.array(reasons, pa.string()))
        if v.details is not None:
            details = [d for d, r in zip(v.details, v.reasons, strict=True) if r is not None]
            rejects = rejects.append_column("detail", pa.array(details, pa.string()))
        return {MAIN: kept, "rejects": rejects}


@dataclass
class JobResult:
    """What a job operator hands back: its main table and optionally side tables and metadata."""

    table: pa.Table | None = None
    metadata: dict[str, Any] | None = None
    #: shards the job wrote itself (through `JobContext.outputs`), by output name
    entries: dict[str, list[dict[str, Any]]] | None = None


class JobOperator(Operator):
    """A whole dataset in, artifacts out (a model folder referred to by a small dataset)."""

    kind: ClassVar[str] = "job"

    def run(self, ctx: JobContext) -> JobResult:
        raise NotImplementedError
