"""CPU stage: generated ids (or candidate scores) -> output columns, with errors and provenance.

`Finish(tokenizer, tasks, provenance, keep)` is a callable over one Arrow batch from infer. Per
generating task it detokenizes the output ids (special tokens such as the final EOS dropped),
counts input and output tokens, keeps the finish reason and gives each output its quality flags
(operators/quality.py: repetition, empty, max_new_tokens, and for a task with a language to check,
wrong_language); with long_input = "chunk" it writes how many pieces the row's text was split into
and the rounds that joined their outputs (1 and 0 for a row that was not split; its input tokens
are then those of every request it took, from infer's TaskColumns.chunking). Per classify task it
turns the candidates' scores into probabilities (softmax over the row's candidates, in float64),
writes every candidate's label, score and probability (OUT_scores) and the chosen label: the most
probable one (ties: the first listed), or with multi_label every label whose probability is at or
above the threshold, most probable first. An errored task has null outputs and null counts of
what it never produced, and its kind and message. The row-level error_kind / error_message repeat
the first failing task's error (prefixed with its column when the job has several tasks), so
"did this row fail?" is one column. The keep columns get their output names back. UNIT and ROW
are kept for the committer, which drops them.

Not here: writing or committing output files (pipeline/commit.py), scoring (model/score.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from model.tokenizer import Tokenizer

from . import columns as C
from . import quality


@dataclass(frozen=True)
class FinishTask:
    """What finish needs to know about one task."""

    output_column: str  # names the task's columns
    classify: bool = False  # a classify task: scores in, label(s) and probabilities out
    multi_label: bool = False  # classify: every label at or above threshold, as a list
    threshold: float | None = None  # classify with multi_label: the probability a label needs
    sequences: int = 1  # generating: outputs per row (num_return_sequences); > 1: list columns
    language: str | None = None  # generating: the detector code its outputs should be in (a translate task's
    # target_language, quality.detector_language); None: no language check

    def __post_init__(self):
        if self.multi_label and (not self.classify or self.threshold is None):
            raise ValueError(f"task {self.output_column}: multi_label is a classify setting and needs a threshold")

    @classmethod
    def of(cls, task: str | FinishTask) -> FinishTask:
        """A task given by its output column alone is a generating task."""
        return task if isinstance(task, FinishTask) else cls(task)


def probabilities(scores: list[float]) -> list[float]:
    """Softmax of a row's candidate scores (float64, stable: shifted by the maximum)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


class Finish:
    def __init__(self, tokenizer: Tokenizer, tasks: list[str | FinishTask], provenance: dict[str, str | None],
                 keep: tuple[str, ...] = ()):
        """`tasks`: a FinishTask per task (an output column name alone stands for a generating task);
        `keep`: the job's output.keep_columns."""
        missing = {C.MODEL_SOURCE, C.MODEL_REVISION, C.RUN_CONFIG_HASH} - set(provenance)
        if missing:
            raise ValueError(f"provenance lacks {sorted(missing)}")
        self.tokenizer = tokenizer
        self.tasks = [FinishTask.of(t) for t in tasks]
        self.output_columns = [t.output_column for t in self.tasks]
        self.provenance = dict(provenance)
        self.keep = tuple(keep)
        if any(t.language for t in self.tasks):
            quality.language_identifier()  # loaded here, once per process, rather than inside the first batch

    @staticmethod
    def required_columns(tasks: list[str | FinishTask], keep: tuple[str, ...] = ()) -> list[str]:
        """The columns a batch must have: from infer, per task its ids, finish reason (classify: labels and
        candidate scores) and errors; the keep columns."""
        per_task = []
        for task in map(FinishTask.of, tasks):
            cols = C.TaskColumns.of(task.output_column)
            made = [cols.labels, cols.candidate_scores] if task.classify else [cols.output_ids, cols.finish_reason]
            per_task += [cols.prompt_ids, *made, cols.error_kind, cols.error_message]
        return [C.UNIT, C.ROW, C.ID] + [C.keep_column(k) for k in keep] + per_task

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.tasks, self.keep), "finish")
        n = batch.num_rows
        out = C.row_columns(batch)
        for name in self.keep:
            out[name] = batch.column(C.keep_column(name))
        row_kind: list[str | None] = [None] * n
        row_message: list[str | None] = [None] * n
        task_out = {}
        for task in self.tasks:
            name = task.output_column
            cols = C.TaskColumns.of(name)
            prompt_ids = batch.column(cols.prompt_ids).to_pylist()
            kinds = batch.column(cols.error_kind).to_pylist()
            messages = batch.column(cols.error_message).to_pylist()
            made = batch.column(cols.candidate_scores if task.classify else cols.output_ids).to_pylist()
            for r in range(n):
                if kinds[r] is None and made[r] is None:  # an internal inconsistency must still be visible
                    kinds[r], messages[r] = "model_error", "no output was produced for this row"
                if kinds[r] is not None and row_kind[r] is None:
                    row_kind[r] = kinds[r]
                    prefix = f"{name}: " if len(self.tasks) > 1 else ""
                    row_message[r] = prefix + (messages[r] or "")
            n_in = [len(p) if p is not None else None for p in prompt_ids]
            ok = [k is None for k in kinds]
            split = (batch.column(cols.chunking).to_pylist() if cols.chunking in batch.column_names
                     else [None] * n)  # only in jobs with long_input = "chunk"
            if task.classify:
                task_out.update(self._labels(task, batch.column(cols.labels).to_pylist(), made, ok))
            else:
                finish = batch.column(cols.finish_reason).to_pylist()
                decode = lambda ids: self.tokenizer.decode_one(ids, skip_special_tokens=True)  # noqa: E731
                flag = lambda ids, text, reason, language=task.language: quality.output_flags(  # noqa: E731
                    ids, text, reason, language)
                if task.sequences > 1:  # per row, a list over its sequences
                    text = [[decode(ids) for ids in seqs] if good else None for seqs, good in zip(made, ok)]
                    counts = [[len(ids) for ids in seqs] if good else None for seqs, good in zip(made, ok)]
                    flags = [[flag(*seq) for seq in zip(seqs, texts, reasons)] if good else None
                             for seqs, texts, reasons, good in zip(made, text, finish, ok)]
                    many = pa.list_
                else:
                    text = [decode(ids) if good else None for ids, good in zip(made, ok)]
                    counts = [len(ids) if good else None for ids, good in zip(made, ok)]
                    flags = [flag(*seq) if good else None for *seq, good in zip(made, text, finish, ok)]
                    many = lambda t: t  # noqa: E731
                task_out[cols.text] = pa.array(text, type=many(pa.string()))
                task_out[cols.output_tokens] = pa.array(counts, type=many(pa.int32()))
                task_out[cols.finish_reason] = pa.array([f if good else None for f, good in zip(finish, ok)],
                                                        type=many(pa.string()))
                n_in = [c["input_tokens"] if c and good else k for c, k, good in zip(split, n_in, ok)]
                task_out[cols.chunks] = pa.array([(c["chunks"] if c else 1) if good else None
                                                  for c, good in zip(split, ok)], type=pa.int32())
                task_out[cols.chunk_depth] = pa.array([(c["depth"] if c else 0) if good else None
                                                       for c, good in zip(split, ok)], type=pa.int32())
                task_out[cols.flags] = pa.array(flags, type=many(pa.list_(pa.string())))
            task_out[cols.input_tokens] = pa.array(n_in, type=pa.int32())
            task_out[cols.error_kind] = pa.array(kinds, type=pa.string())
            task_out[cols.error_message] = pa.array(messages, type=pa.string())
        out[C.ERROR_KIND] = pa.array(row_kind, type=pa.string())
        out[C.ERROR_MESSAGE] = pa.array(row_message, type=pa.string())
        out.update(task_out)
        for key in (C.MODEL_SOURCE, C.MODEL_REVISION, C.RUN_CONFIG_HASH):
            out[key] = pa.array([self.provenance[key]] * n, type=pa.string())
        return pa.table(out)

    @staticmethod
    def _labels(task: FinishTask, labels: list, scores: list, ok: list[bool]) -> dict[str, pa.Array]:
        """A classify task's chosen label(s) and every candidate's label, score and probability."""
        cols = C.TaskColumns.of(task.output_column)
        chosen, entries = [], []
        for row_labels, row_scores, good in zip(labels, scores, ok):
            if not good:
                chosen.append(None)
                entries.append(None)
                continue
            probs = probabilities(row_scores)
            entries.append([{"label": lab, "score": s, "probability": p}
                            for lab, s, p in zip(row_labels, row_scores, probs)])
            ranked = sorted(range(len(probs)), key=lambda i: (-probs[i], i))  # most probable first, ties: listed first
            if task.multi_label:
                chosen.append([row_labels[i] for i in ranked if probs[i] >= task.threshold])
            else:
                chosen.append(row_labels[ranked[0]])
        label_type = pa.list_(pa.string()) if task.multi_label else pa.string()
        return {cols.text: pa.array(chosen, type=label_type), cols.scores: pa.array(entries, type=C.SCORES_TYPE)}
