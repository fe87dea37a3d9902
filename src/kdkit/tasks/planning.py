"""A planning task written as text: find a path through a grid world, output it as moves.

A scenario is an n×n grid with a start, a goal and obstacles, procedurally generated (a path always
exists). The prompt writes the grid row by row, then the start and goal coordinates; the completion
is a move sequence over "UDLR" (up = row − 1, down = row + 1, left = col − 1, right = col + 1)::

    S..#|.#..|...G|....:S00G23>RRDDR<eos>        (4×4; the expert's shortest plan, here 5 moves)

The expert planner is breadth-first search with a fixed move order, so every scenario has one
canonical shortest plan. A plan is executed move by move: it *collides* when it enters an obstacle,
goes *off-grid* when it leaves the grid (execution stops at the first such event), and *succeeds*
when it ends on the goal without either. Difficulty grows with the grid size and the obstacle
density; "ood" (7×7) is larger than anything in the teacher's training set. A teacher policy LM is
trained on expert plans from scratch and cached like the arithmetic teacher
(`kdkit.pipelines.planning_teacher.get_planning_teacher`).
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.tasks.text_tokenizer import EOS, PAD, char_tokenizer

PLANNING_FORMAT_VERSION = 1
CHARACTERS = ".#SG|:>UDLR0123456789"
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
#: difficulty -> (grid size, obstacle density). "ood" is never in the teacher's training mix.
DIFFICULTIES: dict[str, tuple[int, float]] = {
    "easy": (4, 0.10),
    "medium": (5, 0.20),
    "hard": (6, 0.25),
    "ood": (7, 0.25),
}
TRAIN_DIFFICULTIES = ("easy", "medium", "hard")
_PROMPT = re.compile(r"^([.#SG|]+):S(\d)(\d)G(\d)(\d)>$")


def planning_tokenizer() -> Any:
    """Character tokenizer over the grid, coordinate and move characters."""
    return char_tokenizer(CHARACTERS)


@dataclass(frozen=True)
class Scenario:
    """One grid world: `grid` rows of "." (free) / "#" (obstacle); start and goal are (row, col)."""

    grid: tuple[str, ...]
    start: tuple[int, int]
    goal: tuple[int, int]
    difficulty: str

    @property
    def size(self) -> int:
        return len(self.grid)

    @property
    def prompt(self) -> str:
        rows = []
        for r, row in enumerate(self.grid):
            cells = list(row)
            if r == self.start[0]:
                cells[self.start[1]] = "S"
            if r == self.goal[0]:
                cells[self.goal[1]] = "G"
            rows.append("".join(cells))
        return "|".join(rows) + f":S{self.start[0]}{self.start[1]}G{self.goal[0]}{self.goal[1]}>"

    @property
    def completion(self) -> str:
        plan = expert_plan(self)
        if plan is None:  # generation guarantees a path; a hand-made scenario may not have one
            raise ValueError("this scenario has no path from start to goal")
        return plan


def expert_plan(scenario: Scenario) -> str | None:
    """The shortest move sequence from start to goal (breadth-first search, moves tried in UDLR
    order, so the plan is canonical), or None when the goal cannot be reached."""
    n = scenario.size
    previous: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {scenario.start: None}
    queue = deque([scenario.start])
    while queue:
        cell = queue.popleft()
        if cell == scenario.goal:
            moves = []
            while previous[cell] is not None:
                cell, move = previous[cell]  # type: ignore[misc]
                moves.append(move)
            return "".join(reversed(moves))
        for move, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            inside = 0 <= nxt[0] < n and 0 <= nxt[1] < n
            if inside and scenario.grid[nxt[0]][nxt[1]] != "#" and nxt not in previous:
                previous[nxt] = (cell, move)
                queue.append(nxt)
    return None


def make_scenario(rng: random.Random, difficulty: str) -> Scenario:
    """A random solvable scenario of `difficulty` (start ≠ goal, both free, a path exists)."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r} (known: {', '.join(DIFFICULTIES)})")
    n, density = DIFFICULTIES[difficulty]
    while True:
        cells = [(r, c) for r in range(n) for c in range(n)]
        start, goal = rng.sample(cells, 2)
        if abs(start[0] - goal[0]) + abs(start[1] - goal[1]) < 2:
            continue
        grid = [["#" if rng.random() < density else "." for _ in range(n)] for _ in range(n)]
        grid[start[0]][start[1]] = grid[goal[0]][goal[1]] = "."
        scenario = Scenario(tuple("".join(row) for row in grid), start, goal, difficulty)
        if expert_plan(scenario) is not None:
            return scenario


def make_scenarios(n: int, difficulties: Sequence[str] = TRAIN_DIFFICULTIES, seed: int = 0) -> list[Scenario]:
    """`n` scenarios, each difficulty drawn uniformly from `difficulties`."""
    rng = random.Random(seed)
    return [make_scenario(rng, rng.choice(list(difficulties))) for _ in range(n)]


def parse_prompt(prompt: str) -> Scenario:
    """The scenario behind a prompt (special tokens stripped); ValueError when it is not one."""
    match = _PROMPT.match(prompt.replace("<bos>", "").strip())
    if not match:
        raise ValueError(f"not a planning prompt: {prompt!r}")
    rows = match.group(1).split("|")
    start = (int(match.group(2)), int(match.group(3)))
    goal = (int(match.group(4)), int(match.group(5)))
    grid = tuple(row.replace("S", ".").replace("G", ".") for row in rows)
    size = len(grid)
    difficulty = next((name for name, (n, _) in DIFFICULTIES.items() if n == size), f"{size}x{size}")
    return Scenario(grid, start, goal, difficulty)


@dataclass(frozen=True)
class Outcome:
    """What executing a plan did: exactly one of success / collision / off_grid / stopped short
    (ended on a free cell that is not the goal) / invalid (a character that is not a move)."""

    success: bool
    collision: bool
    off_grid: bool
    invalid: bool
    moves: int


def execute(scenario: Scenario, plan: str) -> Outcome:
    """Run `plan` (EOS/pad stripped) from the start; stop at the first collision, off-grid or bad move."""
    plan = plan.replace(EOS, "").replace(PAD, "").strip()
    row, col = scenario.start
    n = scenario.size
    for i, move in enumerate(plan):
        if move not in MOVES:
            return Outcome(False, False, False, True, i)
        row, col = row + MOVES[move][0], col + MOVES[move][1]
        if not (0 <= row < n and 0 <= col < n):
            return Outcome(False, False, True, False, i + 1)
        if scenario.grid[row][col] == "#":
            return Outcome(False, True, False, False, i + 1)
    return Outcome((row, col) == scenario.goal, False, False, False, len(plan))


def check_text(prompt: str, completion: str) -> float:
    """1.0 when the completion, executed on the prompt's grid, reaches the goal safely, else 0.0."""
    return float(execute(parse_prompt(prompt), completion).success)


def planning_dataset(
    n: int, difficulties: Sequence[str] = TRAIN_DIFFICULTIES, seed: int = 0
) -> list[dict[str, Any]]:
    """`{"prompt", "completion", "difficulty_id"}` samples with the expert's plans."""
    names = list(DIFFICULTIES)
    return [
        {"prompt": s.prompt, "completion": s.completion, "difficulty_id": names.index(s.difficulty)}
        for s in make_scenarios(n, difficulties, seed)
    ]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def plan_metrics(
    model: nn.Module, tokenizer: Any, scenarios: Sequence[Scenario], batch_size: int = 128
) -> dict[str, dict[str, float]]:
    """Greedy plans scored by difficulty: {difficulty: {success, collision, off_grid, invalid,
    optimal}} as fractions in [0, 1] ("optimal" = succeeded in as few moves as the expert)."""
    from kdkit.samplers.collate import left_pad

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    need = max(len(s.completion) for s in scenarios) * 2 + 2
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    try:
        for start in range(0, len(scenarios), batch_size):
            chunk = scenarios[start : start + batch_size]
            ids, mask = left_pad([tokenizer(s.prompt)["input_ids"] for s in chunk], tokenizer.pad_token_id)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=need, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, use_cache=True,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=False)
            for scenario, text in zip(chunk, texts):
                outcome = execute(scenario, text.split(EOS)[0])
                row = sums.setdefault(scenario.difficulty, dict.fromkeys(
                    ("success", "collision", "off_grid", "invalid", "optimal"), 0.0))
                row["success"] += outcome.success
                row["collision"] += outcome.collision
                row["off_grid"] += outcome.off_grid
                row["invalid"] += outcome.invalid
                row["optimal"] += outcome.success and outcome.moves == len(scenario.completion)
                counts[scenario.difficulty] = counts.get(scenario.difficulty, 0) + 1
    finally:
        model.train(was_training)
    order = [d for d in DIFFICULTIES if d in sums]
    return {d: {k: v / counts[d] for k, v in sums[d].items()} for d in order}


__all__ = [
    "DIFFICULTIES",
    "MOVES",
    "TRAIN_DIFFICULTIES",
    "Outcome",
    "Scenario",
    "check_text",
    "execute",
    "expert_plan",
    "make_scenario",
    "make_scenarios",
    "parse_prompt",
    "plan_metrics",
    "planning_dataset",
    "planning_tokenizer",
]
