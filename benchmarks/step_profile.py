"""Where a train step's time goes: its compiled ops' profiled times, by part of the solver.

    python benchmarks/step_profile.py              # mlp 256/512: sgd, fne-sgd, fne-adam, gr-kfac
    python benchmarks/step_profile.py --size mlp:64:128 --cases olne-kfac --steps 30

Each case of ``curvature_cost.py`` (same networks, learning rates and
periods) is compiled, trained ``--trained-steps`` steps on other batches,
then run ``--steps`` steps under ``jax.profiler``. On XLA's CPU backend every
op the compiled program executes (a fusion, a dot, an eigendecomposition's
LAPACK call) is one trace event named after its HLO instruction, and the
compiled HLO text keeps each instruction's Python call stack (its
``StackFrames``; a fusion takes the stack of its dot, or of any op inside
it). Each op is attributed to the first of :data:`PARTS` whose functions its
stack passes through: the Lanczos steps' solves count as the safeguard's,
the rollout's as the rollout's. An op's time is its median duration times
how often it ran, which a preempted run on a shared machine does not
inflate (the plain sums are printed beside it). Loops and conditionals count
only through the ops they run; the runs of the while loops per step say on
how many stages the convexity safeguard's Lanczos process ran.

Prints, per case, the parts (ms per step and share), the costliest ops and
the program's op counts (dots, copies, transposes, eigendecompositions,
float64 results); writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile

import jax

import dgnopt_jax as dgnopt

import curvature_cost
import step_time
import timing

# (part, functions): an op belongs to the first part one of whose functions
# its stack contains (a function: its qualified name, the last component of
# it, or "file.py:last"; "a+b": both).
PARTS = (
    ("eigendecompositions", ("symmetric_eigh", "psd_eigh")),
    ("safeguard: Lanczos steps, trace test", ("coupling_scale",)),
    ("rollout: solves", ("rollout+_solve_matrix", "rollout+bellman.py:_solve")),
    ("rollout: feedback products, stage forward", ("rollout",)),
    ("factor statistics A, G", ("folded_factors",)),
    ("EKFAC moments", ("folded_moments",)),
    ("curvature update: averages, debias, Adam moments",
     ("_update_kronecker", "kronecker.py:update", "curvature.py:update")),
    ("gains solve (rotations)", ("_solve_matrix", "bellman.py:_solve")),
    ("quadratic forms S", ("kronecker_forms", "dense_layer", "diagonal_layer", "player_form")),
    ("layer inputs and output derivatives a, g", ("gather_statistics",)),
    ("Q_theta from a, g", ("statistics_gradient", "statistics_gradients")),
    ("Z update: F_x^T Z', mixing", ("vjp_x_columns", "guarded_factor_update")),
    ("value correction", ("value_hessian_product", "gradient_coefficients", "jvp_thetas",
                          "factor_apply")),
    ("trust-region check", ("accepts", "batch_loss", "quadratic_model_change",
                            "_stage_cost_change", "next_scale", "roundoff")),
    ("stall check (host callback)", ("raise_if_stalled",)),
    ("finiteness, keep if applied", ("statistics_finite", "updates_finite", "keep_if_applied",
                                     "all_finite")),
    ("forward", ("forward",)),
    ("terminal value", ("terminal_value",)),
    ("Q_x, Q_theta pullbacks", ("vjp_x", "vjp_x_thetas")),
    ("updates: scatter, apply", ("_by_key", "apply_updates")),
    ("optax: loss and gradient", ("_gradient_step.<locals>.step",)),
)
CONTROL_FLOW = ("while", "conditional", "call")


class Program:
  """The instructions of a compiled program's HLO text and their Python stacks."""

  def __init__(self, text: str):
    self.ops = {}  # name -> (opcode, stack frame id or None, called computation or None)
    self.members = collections.defaultdict(list)  # computation -> its instructions
    self._files, self._functions, self._locations, self._frames = {}, {}, {}, {}
    tables = {"FileNames": self._files, "FunctionNames": self._functions,
              "FileLocations": self._locations, "StackFrames": self._frames}
    table, computation = None, None
    for line in text.splitlines():
      s = line.strip()
      if s in tables:
        table = tables[s]
        continue
      if table is not None and s[:1].isdigit():
        key, rest = s.split(" ", 1)
        table[int(key)] = rest
        continue
      table = None
      header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{$", s)
      if header:
        computation = header.group(1)
        continue
      op = re.match(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", s)
      opcode = re.search(r"(?:^|\s)([a-z][\w\-]*)\(", op.group(2)) if op else None
      if opcode:
        frame = re.search(r"stack_frame_id=(\d+)", s)
        calls = re.search(r"calls=%?([\w.\-]+)", s)
        self.ops[op.group(1)] = (opcode.group(1), int(frame.group(1)) if frame else None,
                                 calls.group(1) if calls else None)
        self.members[computation].append(op.group(1))
    self.text = text

  def frame(self, name: str) -> int | None:
    """The op's stack frame; a fusion's is that of its dot, or of any op inside it."""
    opcode, frame, calls = self.ops[name]
    if frame is not None or calls is None:
      return frame
    inside = [n for n in self.members.get(calls, ()) if self.ops[n][1] is not None]
    inside.sort(key=lambda n: self.ops[n][0] not in ("dot", "custom-call", "convolution"))
    return self.ops[inside[0]][1] if inside else None

  def stack(self, frame: int | None) -> list[tuple[str, str]]:
    """``(file, function)`` from the outermost call to the innermost."""
    out, seen = [], set()
    while frame in self._frames and frame not in seen:
      seen.add(frame)
      location, parent = (int(v) for v in re.findall(
          r"file_location_id=(\d+) parent_frame_id=(\d+)", self._frames[frame])[0])
      file_id, function_id, line = (int(v) for v in re.findall(
          r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)",
          self._locations[location])[0])
      out.append((self._files[file_id].strip('"'), self._functions[function_id].strip('"'),
                  line))
      frame = parent - 1  # the text numbers parents from 1; 0 is none
    return out[::-1]

  def counts(self) -> dict:
    """Static op counts: dots, copies, transposes, custom calls by target, float64 results."""
    out = collections.Counter()
    for opcode, _, _ in self.ops.values():
      if opcode in ("dot", "copy", "transpose", "convolution", "while", "conditional"):
        out[opcode] += 1
    out.update(f"custom-call {t}" for t in re.findall(r'custom_call_target="([^"]+)"', self.text))
    out["float64 results"] = len(re.findall(r"=\s*\(?f64\[", self.text))
    return dict(out)


def part_of(stack: list) -> str:
  names = set()
  for file, function, _ in stack:
    last, base = function.split(".")[-1], os.path.basename(file)
    names.update((function, last, f"{base}:{last}"))
  for part, functions in PARTS:
    for wanted in functions:
      if all(w in names for w in wanted.split("+")):
        return part
  inner = [f"{os.path.basename(f)}:{fn}" for f, fn, _ in stack if "dgnopt_jax" in f]
  return "other: " + (inner[-1] if inner else "outside the library")


def op_events(trace_dir: str) -> list[tuple[str, float]]:
  """``(HLO op, duration in ns)`` of every executed op in a profile."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1]
  out = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          out.append((stats["hlo_op"], event.duration_ns))
  return out


def profile_case(compiled, params, state, x, y, steps: int) -> dict:
  """Per-step times of the parts and ops over ``steps`` profiled steps."""
  program = Program(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        params, state = jax.block_until_ready(compiled(params, state, x, y))[:2]
    events = op_events(trace_dir)
  durations, loops = collections.defaultdict(list), collections.Counter()
  for name, ns in events:
    if name not in program.ops:
      continue
    if program.ops[name][0] in CONTROL_FLOW:
      loops[f"{name} ({program.ops[name][0]})"] += 1
      continue
    durations[name].append(ns)
  parts, plain, ops = collections.Counter(), collections.Counter(), []
  for name, ns in durations.items():
    part = part_of(program.stack(program.frame(name)))
    ms = statistics.median(ns) * len(ns) / steps / 1e6
    parts[part] += ms
    plain[part] += sum(ns) / steps / 1e6
    ops.append({"op": name, "opcode": program.ops[name][0], "part": part,
                "runs_per_step": len(ns) / steps, "ms_per_step": ms})
  ops.sort(key=lambda o: -o["ms_per_step"])
  return {"parts_ms": dict(parts.most_common()), "plain_sums_ms": dict(plain),
          "ops": ops,
          "control_flow_runs_per_step": {k: v / steps for k, v in sorted(loops.items())},
          "counts": program.counts()}


def table(name: str, result: dict, top: int) -> str:
  total = sum(result["parts_ms"].values())
  lines = [f"{name}: {total:.2f} ms of ops per step (plain sums "
           f"{sum(result['plain_sums_ms'].values()):.2f} ms)", "",
           "| part | ms / step | share | plain sum (ms) |", "|---|---|---|---|"]
  for part, ms in result["parts_ms"].items():
    lines.append(f"| {part} | {ms:.3f} | {100 * ms / total:.1f} % | "
                 f"{result['plain_sums_ms'][part]:.3f} |")
  lines += ["", "| op | runs / step | ms / step | part |", "|---|---|---|---|"]
  for o in result["ops"][:top]:
    lines.append(f"| {o['op']} ({o['opcode']}) | {o['runs_per_step']:.2f} | "
                 f"{o['ms_per_step']:.3f} | {o['part']} |")
  runs = ", ".join(f"{k} {v:.2f}" for k, v in result["control_flow_runs_per_step"].items())
  lines += ["", f"loops and conditionals, runs per step: {runs or 'none'}",
            f"op counts: {result['counts']}"]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="mlp:256:512", help="model:width:batch, as curvature_cost.py")
  p.add_argument("--cases", default="optax.sgd,fne-sgd,fne-adam,gr-kfac",
                 help="comma-separated cases of curvature_cost.py")
  p.add_argument("--steps", type=int, default=20, help="profiled steps per case")
  p.add_argument("--trained-steps", type=int, default=30)
  p.add_argument("--top", type=int, default=15, help="costliest ops listed per case")
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  try:
    ((model, width, batch),) = curvature_cost.parse_sizes(args.size)
  except ValueError as e:
    p.error(str(e))
  device, machine = timing.device_and_machine("cpu")
  game, params, x, y, first = curvature_cost.problem(model, width, batch, args.trained_steps,
                                                     device)
  built = curvature_cost.cases(game, with_every_step_statistics=True)
  names = [n for n in args.cases.split(",") if n]
  unknown = sorted(set(names) - set(built))
  if unknown:
    p.error(f"unknown cases {unknown}; known: {sorted(built)}")
  limit = dgnopt.limit_lapack_threads(1)  # as the timed benchmarks run
  results = {}
  try:
    for name in names:
      init, step = built[name]
      state = init(params)
      compiled, _, _ = step_time.compile_ahead(step, params, state, x, y)
      start = step_time.train_first(compiled, params, state, iter(first), args.trained_steps)
      jax.block_until_ready(compiled(*start, x, y))  # warm-up
      results[name] = profile_case(compiled, *start, x, y, args.steps)
      print(f"\n{table(name, results[name], args.top)}\n", flush=True)
  finally:
    limit.restore_original_limits()
  print(machine)
  timing.write_record(args.out, f"step_profile_{model}_{width}_{batch}.json",
                      {"machine": machine, "size": args.size, "steps": args.steps,
                       "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
