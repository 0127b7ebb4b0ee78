"""The table-card schema: one typed, strict description of everything a card may say.

`Card.model_validate(raw)` checks the structure (every key known, every value of the right type and
range); `check_against_registry(card)` then checks what needs the plugins: the task, model and method
names, each method's `Options` and `Settings` blocks, each task's `Data` block, and that every recipe key
a profile sets is implemented by the cell's task and model. `bench.cards` ties both together.

A profile is three choices (README "Run a table on your own data and model"):
- the data: `data_source: synthetic` (the task's generator writes a small data set in the real layout) or
  `folder` (read the task's public layout under --data-root / BENCH_DATA), plus the task's `data:` keys;
- the dense model: `dense:` alone (train it from scratch with that recipe), `checkpoint:` alone (load a
  file or folder), or both (load the checkpoint, then finetune it densely on the task: a pre-trained
  base model needs its task head trained before anything is pruned);
- the budgets: `finetune:` and one block per method (`upop:`, `sgmp:` ...).
`micro` and `paper` are two such profiles; a card may define its own (`--profile mine`).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from bench.options import NonNegInt, OpenFraction, OptionsModel, PositiveInt, block_errors
from bench.recipe import DATA_RECIPE_KEYS, MODEL_RECIPE_KEYS, TrainRecipe

DENSE_RATIO_LABEL = "1x"
EXTRA_REFERENCE_KEYS = ("params_m", "gflops")    # reference columns that are not task metrics
REFERENCE_ROW_KEYS = ("method", "ratio", "source", "note", "part")   # the rest of a reference row are values
# relations a paper states without a number per cell, and the fields each needs (checked by
# bench.report.relation_checks): "no accuracy loss", "0.96% above SGMP", "26.57% faster"
RELATION_KINDS = {
    "no_loss_vs_dense": ("ratio", "metric", "tolerance"),
    "below_dense_by": ("ratio", "metric", "by", "tolerance"),
    "above": ("other", "ratios", "metric", "by", "tolerance"),
    "above_value": ("ratio", "metric", "value", "by", "tolerance"),
    "speedup": ("ratio", "value", "tolerance"),
}
Number = float   # strict: an int or a float, never a string
# what a cell's seed may vary (profiles.<name>.seed_varies)
SEED_PARTS = ("data_order", "dense", "pruning", "finetune")


def _tolerance(v):
    if isinstance(v, bool) or not (isinstance(v, (int, float)) or (isinstance(v, str) and v.endswith("%"))):
        raise ValueError("a tolerance is a number (absolute) or 'N%' (relative)")
    if isinstance(v, str):
        float(v[:-1])
    return v


class Ratio(OptionsModel):
    label: str = Field(description="the ratio's name in tables and on the command line (--ratios), e.g. 2x or 40%")
    p: OpenFraction = Field(description="fraction removed, in (0, 1); what it is a fraction of is the card's ratio_meaning")
    model: str | None = Field(None, description="this ratio's own model name (cards with several models, e.g. DeiT-Tiny and -Small)")


class Metric(OptionsModel):
    name: str = Field(description="a metric the task computes (bench ls tasks)")
    split: str = Field(description="the split it is computed on (never used for selection)")
    higher_is_better: bool = Field(description="direction, for judging and plots")
    primary: bool = Field(False, description="the table's main metric (exactly one per task)")
    task: str | None = Field(None, description="multi-task cards: the task that computes it")


class FlopsProtocol(OptionsModel):
    input: str = Field(description="the dummy input the paper counts, in words")
    batch_size: PositiveInt = Field(1, description="batch of the count")
    counter: str = Field("bench.dispatch", description="the MAC counter (the suite's dispatch counter)")
    convention: str = Field("fma1_attn_incl", description="one multiply-add = one FLOP, attention matmuls included")


class Throughput(OptionsModel):
    batch_size: PositiveInt = Field(description="samples per timed forward")
    warmup: NonNegInt = Field(description="untimed forwards first")
    iters: PositiveInt = Field(description="timed forwards per trial")
    trials: PositiveInt = Field(description="trials; the median is reported")
    precision_cuda: str = Field("amp_fp16", description="precision on CUDA")
    precision_cpu: str = Field("fp32", description="precision on CPU")


class ThroughputOverride(OptionsModel):
    batch_size: PositiveInt | None = Field(None, description="overrides protocol.throughput.batch_size")
    warmup: NonNegInt | None = Field(None, description="overrides protocol.throughput.warmup")
    iters: PositiveInt | None = Field(None, description="overrides protocol.throughput.iters")
    trials: PositiveInt | None = Field(None, description="overrides protocol.throughput.trials")


class Protocol(OptionsModel):
    flops: FlopsProtocol = Field(description="how FLOPs are counted")
    throughput: Throughput = Field(description="how throughput is timed")


class Profile(OptionsModel):
    model: str = Field(description="architecture of the card's model under this profile (bench ls models)")
    models: dict[str, str] = Field({}, description="architecture of each other model name of the card's ratios")
    data_source: Literal["synthetic", "folder"] | None = Field(
        None, description="synthetic: the task's generator writes a small data set (no --data-root); folder: read the "
                          "task's public layout under --data-root or BENCH_DATA. Default: synthetic for a profile named "
                          "micro, folder otherwise")
    data: dict = Field({}, description="the task's data keys (bench ls tasks --options)")
    tasks: list[str] | None = Field(None, description="multi-task cards: the tasks this profile runs (default: all)")
    ratios: list[str] | None = Field(None, description="the ratio labels this profile runs by default (default: all)")
    seed_varies: list[Literal[tuple(SEED_PARTS)]] = Field(
        list(SEED_PARTS), description="what a cell's seed varies: data_order (the order of the training batches of "
                                      "every phase), dense (the dense model's initialisation and training), pruning "
                                      "(the method's own randomness), finetune (the finetune's randomness); the parts "
                                      "not listed use seed 0 for every seed. Default: all four (each seed trains its "
                                      "own dense model when the profile trains one)")
    dense: TrainRecipe | None = Field(None, description="train the dense model with this recipe (from scratch, or from "
                                                        "the checkpoint when one is given)")
    checkpoint: str | None = Field(None, description="the dense model's weights: a file or a transformers folder, "
                                                     "relative to --checkpoints or absolute")
    checkpoints: dict[str, str] = Field({}, description="a checkpoint per model name or per task (multi-part cards)")
    config_overrides: dict = Field({}, alias="model_config",
                                   description="overrides of the architecture's config (e.g. its vocabulary size)")
    finetune: TrainRecipe | None = Field(None, description="the finetune after pruning (recipe keys: bench ls recipe)")
    throughput: ThroughputOverride | None = Field(None, description="overrides of protocol.throughput for this profile")
    method_settings: dict[str, dict] = Field({}, description="per-method budgets, written as `<method>: {...}` keys")
    budgets: list[Literal["paper", "matched"]] = Field(
        ["paper"], min_length=1,
        description="training budgets to run: paper (each method as its paper: e.g. UPop searches, then retrains "
                    "for finetune.epochs; SOMP only finetunes) and/or matched (every method's training before and "
                    "in its finetune adds up to the budget_reference method's; its rows form the part 'matched')")
    budget_reference: str | None = Field(
        None, description="budget matched: the method whose search + finetune epochs every method gets (default: the "
                          "card's first method that trains before its finetune, e.g. upop)")
    per_ratio: dict[str, dict[str, dict]] = Field(
        {}, description="budgets that differ by ratio: {ratio label: {finetune or a method's block: the keys that "
                        "change}} (UPop NLVR2: 2x 15, 3x 20, 4x 23, 5x 24, 10x 27 search + retrain epochs)")

    @field_validator("per_ratio", mode="before")
    @classmethod
    def _ratio_keys_as_text(cls, v):
        return {str(k): b for k, b in v.items()} if isinstance(v, dict) else v

    def finetune_for(self, label: str) -> TrainRecipe | None:
        """The finetune recipe of one ratio (the profile's, with that ratio's per_ratio changes)."""
        change = (self.per_ratio.get(label) or {}).get("finetune")
        return self.finetune.with_(**change) if change and self.finetune else self.finetune

    def method_settings_for(self, key: str, label: str) -> dict | None:
        """A method's settings block for one ratio, as written (validated by the method's Settings class)."""
        base, change = self.method_settings.get(key), (self.per_ratio.get(label) or {}).get(key)
        return {**(base or {}), **change} if change else base

    @field_validator("ratios", mode="before")
    @classmethod
    def _labels_as_text(cls, v):
        return [str(x) for x in v] if isinstance(v, list) else v

    def source(self, name: str) -> str:
        return self.data_source or ("synthetic" if name == "micro" else "folder")

    def has_dense_source(self) -> bool:
        return bool(self.dense or self.checkpoint or self.checkpoints)


class References(OptionsModel):
    source: str = Field(description="where the numbers come from (paper, table, README)")
    profile: str = Field("paper", description="the profile the numbers are judged on")
    tolerance: dict[str, object] = Field({}, description="per value: a number (absolute) or 'N%' (relative)")
    rows: list[dict] = Field([], description="one row per cell: method, ratio, values (metrics, params_m, gflops)")
    absent: str | None = Field(None, description="why the paper's numbers are absent (when rows is empty)")

    @field_validator("tolerance")
    @classmethod
    def _tols(cls, v):
        return {k: _tolerance(t) for k, t in v.items()}

    @field_validator("rows", mode="before")
    @classmethod
    def _ratio_text(cls, rows):
        if isinstance(rows, list):
            return [{**r, "ratio": str(r["ratio"])} if isinstance(r, dict) and "ratio" in r else r for r in rows]
        return rows


class Relation(OptionsModel):
    kind: Literal[tuple(RELATION_KINDS)] = Field(description="what the paper states")
    method: str = Field(description="the method it is about")
    source: str = Field(description="where the paper says it")
    ratio: str | None = Field(None, description="the ratio label it is about")
    ratios: list[str] | None = Field(None, description="the ratio labels it holds at (kind above)")
    other: str | None = Field(None, description="the method or comparator compared with (kind above)")
    metric: str | None = Field(None, description="the metric it is about")
    by: Number | None = Field(None, description="the stated margin, in the metric's unit")
    value: Number | None = Field(None, description="the stated value (above_value, speedup)")
    tolerance: Number | None = Field(None, description="how far off still counts as holding")
    meaning: str | None = Field(None, description="what the statement means, in words")
    measure: str | None = Field(None, description="speedup: what is timed")
    checked: bool = Field(False, description="a FAIL of this relation (on the reference profile) fails the cells "
                                             "it is about; unchecked relations are only reported")

    @model_validator(mode="before")
    @classmethod
    def _text_labels(cls, v):
        if isinstance(v, dict):
            v = dict(v)
            if "ratio" in v and v["ratio"] is not None:
                v["ratio"] = str(v["ratio"])
            if isinstance(v.get("ratios"), list):
                v["ratios"] = [str(x) for x in v["ratios"]]
        return v

    @model_validator(mode="after")
    def _fields_of_kind(self):
        missing = [k for k in RELATION_KINDS[self.kind] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.kind} relation needs {', '.join(missing)}")
        return self


class Comparator(OptionsModel):
    """A published row of a method the suite does not run (shown for context, never judged)."""
    method: str = Field(description="the published method's name")
    ratio: str = Field(description="the ratio label it is shown at")
    source: str = Field(description="where the row is published")
    params_m: Number | None = Field(None, description="params, millions")
    gflops: Number | None = Field(None, description="GFLOPs (MACs)")
    top1: Number | None = Field(None, description="top-1 accuracy, %")

    @field_validator("ratio", mode="before")
    @classmethod
    def _text(cls, v):
        return str(v)


class Card(OptionsModel):
    table: str = Field(description="the card's name = its file name without .yaml")
    version: PositiveInt = Field(description="bump when a change alters results (records of other versions are not reused)")
    title: str = Field(description="the table's title")
    paper: str = Field(description="the paper (authors, title, venue, arXiv)")
    task: str | None = Field(None, description="the task (bench ls tasks)")
    tasks: list[str] | None = Field(None, description="several tasks (GLUE); each gets its own rows")
    model: str = Field(description="the model's name; each profile maps it to an architecture")
    methods: list[str] = Field(min_length=1, description="methods to run (bench ls methods); dense gives the 1x row")
    method_options: dict[str, dict] = Field({}, description="per method: its options (bench ls methods --options)")
    ratio_meaning: str = Field(description="what p is a fraction of, in words")
    ratio_basis: Literal["prunable", "total"] = Field("prunable", description="p of the prunable params or of all params")
    ratios: list[Ratio] = Field(min_length=1, description="the compression ratios")
    metrics: list[Metric] = Field(min_length=1, description="the reported metrics")
    selection: str = Field(description="which checkpoint is evaluated, in words (never the best epoch on the test split)")
    protocol: Protocol = Field(description="FLOPs and throughput protocol")
    profiles: dict[str, Profile] = Field(min_length=1, description="named profiles: micro (default), paper, your own")
    references: References | None = Field(None, description="the paper's numbers; leave out (or null) for none")
    relations: list[Relation] = Field([], description="relations the paper states without a number per cell")
    comparators: list[Comparator] = Field([], description="published rows of methods the suite does not run")
    notes: list[str] = Field([], description="deviations, guesses and their reasons")
    _path: str | None = PrivateAttr(None)   # the file it was read from

    @model_validator(mode="before")
    @classmethod
    def _method_blocks(cls, raw):
        """A profile's `<method>: {...}` keys are the methods' settings blocks: gather them under method_settings
        so every other unknown key of a profile is still refused."""
        if not isinstance(raw, dict) or not isinstance(raw.get("profiles"), dict):
            return raw
        from bench.registry import METHODS
        names = set()
        for m in METHODS.names():
            names |= {m, METHODS.get(m).settings_key or m}
        raw = dict(raw, profiles=dict(raw["profiles"]))
        for pname, prof in raw["profiles"].items():
            if isinstance(prof, dict):
                fields = set(Profile.model_fields)
                blocks = {k: v for k, v in prof.items() if k in names and k not in fields}
                rest = {k: v for k, v in prof.items() if k not in blocks}
                raw["profiles"][pname] = {**rest, "method_settings": {**(prof.get("method_settings") or {}), **blocks}} \
                    if blocks else prof
        return raw

    @model_validator(mode="after")
    def _consistent(self):
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give either task: (one task) or tasks: (a list)")
        labels = [r.label for r in self.ratios]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"ratio label(s) {dup} appear twice")
        return self

    # ------------------------------------------------------------------ helpers the runner and report use
    def task_names(self) -> list:
        return list(self.tasks or [self.task])

    def ratio_by_label(self) -> dict:
        return {r.label: r for r in self.ratios}

    def profile(self, name: str) -> Profile:
        from bench.errors import UnknownName
        if name not in self.profiles:
            raise UnknownName("profile", name, list(self.profiles))
        return self.profiles[name]

    def reference_row(self, method: str, ratio_label: str, profile: str, part: str | None = None):
        refs = self.references
        if refs is None or refs.profile != profile:
            return None
        for row in refs.rows:
            if row.get("method") == method and str(row.get("ratio")) == str(ratio_label) and row.get("part") in (None, part):
                return row
        return None


def metric_direction_errors(mt: Metric, where: str) -> list:
    """The card's metric against the declared metrics (metrics.METRICS): an unknown name, or a
    higher_is_better the other way round (judging and plots would rank the methods backwards)."""
    from metrics import METRICS
    info = METRICS.get(mt.name)
    if info is None:
        from bench.errors import UnknownName
        return [f"{where}.name: {UnknownName('metric', mt.name, METRICS)} Declare a new metric once with "
                "metrics.register_metric(name, higher_is_better, description)"]
    if mt.higher_is_better != info.higher_is_better:
        return [f"{where}.higher_is_better: metric {mt.name!r} ({info.description}) is "
                f"{'higher' if info.higher_is_better else 'lower'} is better: set higher_is_better: "
                f"{'true' if info.higher_is_better else 'false'}"]
    return []


def check_against_registry(card: Card) -> list:
    """Problems that need the plugins, as sentences naming the card path of each."""
    from bench.errors import UnknownName
    from bench.registry import METHODS, MODELS, TASKS

    errs: list = []
    tasks = card.task_names()
    for i, t in enumerate(tasks):
        if t not in TASKS:
            errs.append(f"{'task' if card.task else f'tasks[{i}]'}: {UnknownName('task', t, TASKS.names())}")
    known_tasks = [t for t in tasks if t in TASKS]
    for i, m in enumerate(card.methods):
        if m not in METHODS:
            errs.append(f"methods[{i}]: {UnknownName('method', m, METHODS.names())}")
    methods = [m for m in card.methods if m in METHODS]
    for m, opts in card.method_options.items():
        if m not in card.methods:
            errs.append(f"method_options.{m}: {m!r} is not in methods {card.methods}")
        elif m in METHODS:
            errs += block_errors(METHODS.get(m).Options, opts, f"method_options.{m}")
    labels = {r.label for r in card.ratios}
    names = {r.model or card.model for r in card.ratios}
    for i, mt in enumerate(card.metrics):
        if mt.task is not None and mt.task not in tasks:
            errs.append(f"metrics[{i}].task: {mt.task!r} is not one of the card's tasks {tasks}")
        n_errs = len(errs)
        for t in ([mt.task] if mt.task else known_tasks):
            if t in TASKS and mt.name not in TASKS.get(t).metrics:
                errs.append(f"metrics[{i}].name: task {t} does not compute {mt.name!r} (it has "
                            f"{sorted(TASKS.get(t).metrics)}); give the metric a 'task:' key if only some tasks compute it")
        if len(errs) == n_errs:     # a name no task computes is already reported
            errs += metric_direction_errors(mt, f"metrics[{i}]")
    for t in tasks:
        of_t = [m for m in card.metrics if (m.task or t) == t]
        if of_t and sum(m.primary for m in of_t) != 1:
            errs.append(f"metrics: exactly one metric {'of ' + t + ' ' if len(tasks) > 1 else ''}must have 'primary: true'")
    for pname, prof in card.profiles.items():
        where = f"profiles.{pname}"
        archs = {card.model: prof.model, **prof.models}
        for key, a in [("model", prof.model)] + [(f"models.{k}", v) for k, v in prof.models.items()]:
            if a not in MODELS:
                errs.append(f"{where}.{key}: {UnknownName('model', a, MODELS.names())}")
        for n in names:
            if n not in archs and n not in MODELS:
                errs.append(f"{where}.models: the ratios' model {n!r} has no architecture here")
        if prof.tasks is not None and not set(prof.tasks) <= set(tasks):
            errs.append(f"{where}.tasks: {prof.tasks} must be a sub-list of the card's tasks {tasks}")
        for lab in prof.ratios or []:
            if lab not in labels:
                errs.append(f"{where}.ratios: {lab!r} is not a ratio label of this card ({sorted(labels)})")
        if not prof.has_dense_source():
            errs.append(f"{where}: no dense model: give dense: (a recipe to train it from scratch on the task), "
                        "checkpoint: (a file or folder), or both (the checkpoint, then a dense finetune on the task)")
        for t in prof.tasks or known_tasks:
            if t not in TASKS:
                continue
            errs += [e + (f" (task {t})" if len(tasks) > 1 else "") for e in block_errors(TASKS.get(t).Data, prof.data, f"{where}.data")]
        if any(METHODS.get(m).finetune for m in methods) and prof.finetune is None:
            errs.append(f"{where}: missing finetune: (the recipe of the finetune after pruning: epochs, lr, batch_size)")
        if prof.budget_reference is not None and prof.budget_reference not in card.methods:
            errs.append(f"{where}.budget_reference: {prof.budget_reference!r} is not in methods {card.methods}")
        if prof.budget_reference is not None and "matched" not in prof.budgets:
            errs.append(f"{where}.budget_reference: only used with budgets: [.., matched]; add matched or remove it")
        settings_of = {METHODS.get(m).settings_key or m: m for m in methods}
        for key, block in prof.method_settings.items():
            if key not in settings_of:
                errs.append(f"{where}.{key}: settings of a method this card does not run (methods: {card.methods})")
                continue
            errs += block_errors(METHODS.get(settings_of[key]).Settings, block, f"{where}.{key}")
        for key, m in settings_of.items():
            settings_cls = METHODS.get(m).Settings
            required = [f for f, fi in settings_cls.model_fields.items() if fi.is_required()]
            if required and key not in prof.method_settings:
                errs.append(f"{where}.{key}: missing (method {m} needs {', '.join(required)})")
        for lab, blocks in prof.per_ratio.items():
            w = f"{where}.per_ratio.{lab}"
            if lab not in labels:
                errs.append(f"{w}: {lab!r} is not a ratio label of this card ({sorted(labels)})")
                continue
            for key, change in blocks.items():
                if key == "finetune":
                    if prof.finetune is None:
                        errs.append(f"{w}.finetune: the profile has no finetune block to change")
                    else:
                        errs += block_errors(TrainRecipe, {**prof.finetune.model_dump(), **change}, f"{w}.finetune")
                elif key in settings_of:
                    errs += block_errors(METHODS.get(settings_of[key]).Settings,
                                         prof.method_settings_for(key, lab), f"{w}.{key}")
                else:
                    errs.append(f"{w}.{key}: neither finetune nor the settings of a method of this card "
                                f"({', '.join(sorted(settings_of))})")
        # every recipe key set must be implemented by the tasks and models that train with it
        for block_name, recipe in (("dense", prof.dense), ("finetune", prof.finetune)):
            if recipe is None:
                continue
            if block_name == "dense" and recipe.selection != "final":
                errs.append(f"{where}.dense.selection: only the finetune after pruning selects an epoch "
                            f"(selection: paper); the dense training keeps its final model")
            if recipe.selection_metric is not None:
                for t in prof.tasks or known_tasks:
                    if t in TASKS and recipe.selection_metric not in TASKS.get(t).metrics:
                        errs.append(f"{where}.{block_name}.selection_metric: task {t} does not compute "
                                    f"{recipe.selection_metric!r} (it has {sorted(TASKS.get(t).metrics)})")
            changed = recipe.changed_keys()
            for t in prof.tasks or known_tasks:
                if t not in TASKS:
                    continue
                missing = sorted(k for k in changed if k in DATA_RECIPE_KEYS and k not in TASKS.get(t).RECIPE_KEYS)
                if missing:
                    errs.append(f"{where}.{block_name}.{missing[0]}: task {t} does not implement "
                                f"{', '.join(missing)} (it implements {sorted(TASKS.get(t).RECIPE_KEYS) or 'none'}); "
                                "remove the key(s)")
            for a in set(archs.values()):
                if a not in MODELS:
                    continue
                fam = MODELS.get(a)[0]
                missing = sorted(k for k in changed if k in MODEL_RECIPE_KEYS and k not in fam.RECIPE_KEYS)
                if missing:
                    errs.append(f"{where}.{block_name}.{missing[0]}: model family {fam.family} ({a}) does not implement "
                                f"{', '.join(missing)}; remove the key(s)")
    refs = card.references
    if refs is not None:
        if refs.profile not in card.profiles:
            errs.append(f"references.profile: {refs.profile!r} is not a profile of this card ({sorted(card.profiles)})")
        metric_names = {m.name for m in card.metrics}
        if not refs.rows and not card.relations and not refs.absent:
            errs.append("references.rows: empty; say why the paper's numbers are absent in references.absent, "
                        "or drop the references block")
        for i, row in enumerate(refs.rows):
            w = f"references.rows[{i}]"
            if "method" not in row:
                errs.append(f"{w}.method: missing (required)")
            if "ratio" not in row:
                errs.append(f"{w}.ratio: missing (required)")
            elif str(row["ratio"]) not in labels | {DENSE_RATIO_LABEL}:
                errs.append(f"{w}.ratio: {row['ratio']!r} is not a ratio label of this card")
            values = {k: v for k, v in row.items() if k not in REFERENCE_ROW_KEYS}
            if not values:
                errs.append(f"{w}: no reference values")
            for k, v in values.items():
                if k not in metric_names | set(EXTRA_REFERENCE_KEYS):
                    errs.append(f"{w}.{k}: neither a metric of the card nor one of {list(EXTRA_REFERENCE_KEYS)}")
                elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    errs.append(f"{w}.{k}: must be a number, got {v!r}")
                elif k not in refs.tolerance:
                    errs.append(f"{w}.{k}: no tolerance for {k!r} in references.tolerance")
    comparators = {c.method for c in card.comparators}
    metric_names = {m.name for m in card.metrics}
    for i, rel in enumerate(card.relations):
        w = f"relations[{i}]"
        if rel.method not in card.methods:
            errs.append(f"{w}.method: {rel.method!r} is not run by this card")
        if rel.other is not None and rel.other not in set(card.methods) | comparators:
            errs.append(f"{w}.other: {rel.other!r} is neither run by this card nor a comparator")
        for lab in rel.ratios or [rel.ratio]:
            if lab is not None and lab not in labels:
                errs.append(f"{w}: ratio {lab!r} is not a ratio label of this card")
        if rel.kind != "speedup" and rel.metric not in metric_names:
            errs.append(f"{w}.metric: {rel.metric!r} is not a metric of the card")
    return errs
