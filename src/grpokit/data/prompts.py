"""`PromptSet`: the rows of a dataset ready to sample from, for training and evaluation alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptSet:
    """Per dataset row: its prompt as given (a string or messages, as the rewards see it), its
    token ids, its other columns (for the rewards and the environments) and its images'
    processor tensors (`grpokit.data.vision.VisionInputs`, None for a row without images)."""

    prompts: list
    prompt_ids: list[list[int]]
    columns: dict[str, list] = field(default_factory=dict)
    conversational: bool = False
    vision: list | None = None      # None: no row has images

    def __post_init__(self):
        n = len(self.prompt_ids)
        if len(self.prompts) != n or any(len(col) != n for col in self.columns.values()):
            raise ValueError(f"PromptSet: {len(self.prompts)} prompts, {n} token lists and columns of "
                             f"{sorted({len(c) for c in self.columns.values()})} rows must all have one entry a row.")
        if self.vision is not None and len(self.vision) != n:
            raise ValueError(f"PromptSet: {len(self.vision)} image entries for {n} rows.")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row(self, r: int) -> dict:
        """Row r as a dict: its prompt and every other column."""
        return {"prompt": self.prompts[r], **{k: v[r] for k, v in self.columns.items()}}

    def columns_of(self, rows: list[int]) -> dict[str, list]:
        """Every column but the prompt, for these rows in this order (one entry per sample)."""
        return {k: [v[r] for r in rows] for k, v in self.columns.items()}

    def images_of(self, rows: list[int]) -> list | None:
        """Each row's images (None for a row without), or None when no row has any."""
        return None if self.vision is None else [self.vision[r] for r in rows]

    @classmethod
    def from_rows(cls, rows: list[dict], prompt_ids: list[list[int]], *, conversational: bool,
                  vision: list | None = None) -> "PromptSet":
        """From row dicts (each with a 'prompt')."""
        names = [k for k in (rows[0] if rows else {}) if k != "prompt"]
        return cls(prompts=[r["prompt"] for r in rows], prompt_ids=prompt_ids,
                   columns={k: [r.get(k) for r in rows] for k in names}, conversational=conversational, vision=vision)
