"""CPU stage: generated ids -> output columns (text, token counts, finish reason, errors, provenance).

`Finish(tokenizer, output_columns, provenance)` is a callable over one Arrow batch from infer. Per
task it detokenizes the output ids (special tokens such as the final EOS dropped), counts input
and output tokens, and keeps the finish reason; an errored task has null text and null counts
of what it never produced, and its kind and message. The row-level error_kind / error_message
repeat the first failing task's error (prefixed with its column when the job has several tasks),
so "did this row fail?" is one column. UNIT and ROW are kept for the committer, which drops them.

Not here: writing or committing output files (pipeline/commit.py).
"""

from __future__ import annotations

import pyarrow as pa

from model.tokenizer import Tokenizer

from . import columns as C


class Finish:
    def __init__(self, tokenizer: Tokenizer, output_columns: list[str], provenance: dict[str, str | None]):
        missing = {C.MODEL_SOURCE, C.MODEL_REVISION, C.RUN_CONFIG_HASH} - set(provenance)
        if missing:
            raise ValueError(f"provenance lacks {sorted(missing)}")
        self.tokenizer = tokenizer
        self.output_columns = list(output_columns)
        self.provenance = dict(provenance)

    @staticmethod
    def required_columns(output_columns: list[str]) -> list[str]:
        """The columns a batch must have: from infer, per task its ids, finish reason and errors."""
        per_task = []
        for name in output_columns:
            cols = C.TaskColumns.of(name)
            per_task += [cols.prompt_ids, cols.output_ids, cols.finish_reason, cols.error_kind, cols.error_message]
        return [C.UNIT, C.ROW, C.ID] + per_task

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.output_columns), "finish")
        n = batch.num_rows
        out = {C.UNIT: batch.column(C.UNIT), C.ROW: batch.column(C.ROW), C.ID: batch.column(C.ID)}
        row_kind: list[str | None] = [None] * n
        row_message: list[str | None] = [None] * n
        task_out = {}
        for name in self.output_columns:
            cols = C.TaskColumns.of(name)
            prompt_ids = batch.column(cols.prompt_ids).to_pylist()
            output_ids = batch.column(cols.output_ids).to_pylist()
            finish = batch.column(cols.finish_reason).to_pylist()
            kinds = batch.column(cols.error_kind).to_pylist()
            messages = batch.column(cols.error_message).to_pylist()
            texts, n_in, n_out, reasons = [], [], [], []
            for r in range(n):
                ok = kinds[r] is None and output_ids[r] is not None
                if not ok and kinds[r] is None:  # an internal inconsistency must still be visible
                    kinds[r], messages[r] = "model_error", "no output was produced for this row"
                texts.append(self.tokenizer.decode_one(output_ids[r], skip_special_tokens=True) if ok else None)
                n_in.append(len(prompt_ids[r]) if prompt_ids[r] is not None else None)
                n_out.append(len(output_ids[r]) if ok else None)
                reasons.append(finish[r] if ok else None)
                if not ok and row_kind[r] is None:
                    row_kind[r] = kinds[r]
                    prefix = f"{name}: " if len(self.output_columns) > 1 else ""
                    row_message[r] = prefix + (messages[r] or "")
            task_out[cols.text] = pa.array(texts, type=pa.string())
            task_out[cols.input_tokens] = pa.array(n_in, type=pa.int32())
            task_out[cols.output_tokens] = pa.array(n_out, type=pa.int32())
            task_out[cols.finish_reason] = pa.array(reasons, type=pa.string())
            task_out[cols.error_kind] = pa.array(kinds, type=pa.string())
            task_out[cols.error_message] = pa.array(messages, type=pa.string())
        out[C.ERROR_KIND] = pa.array(row_kind, type=pa.string())
        out[C.ERROR_MESSAGE] = pa.array(row_message, type=pa.string())
        out.update(task_out)
        for key in (C.MODEL_SOURCE, C.MODEL_REVISION, C.RUN_CONFIG_HASH):
            out[key] = pa.array([self.provenance[key]] * n, type=pa.string())
        return pa.table(out)
