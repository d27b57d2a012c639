"""Markdown tables for BENCHMARKS.md from the benchmarks' JSON files (so no figure is copied by hand).

python bench/tables.py bench/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_speed(rows: list) -> str:
    out = ["| configuration | variant | images | epoch s | floor s | ratio | ratio at the run's best rate | warm-up s "
           "| matmul GFLOP/s | load | TF_ENABLE_ONEDNN_OPTS | loss | accuracy | last-batch acc |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        onednn = {"default (on)": "unset"}.get(r.get("onednn"), r.get("onednn"))  # runs before the tenth round
        out.append(f"| {r['config']} | {r['variant']} | {r['n_train']} | {r['epoch_s']:.2f} | {r['floor_s']:.2f} "
                   f"| {r['ratio']:.2f} | {r['ratio_best']:.2f} | {r['warmup_s']:.1f} | {r['matmul_gflops']:.0f} "
                   f"| {r['load_average_1min']:.1f} | {onednn} | {r['loss']:.6f} | {r['accuracy']:.6f} "
                   f"| {r['last_batch_accuracy']:.6f} |")  # fmt: skip
    return "\n".join(out)


def trial_overhead(d: dict) -> str:
    out = ["| trial | learning rate | model | wall s | epochs s | overhead | + first-epoch tracing | build+compile s "
           "| fit set-up s | test eval s | other s |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in d["overhead"]:
        trial = f"{r['trial']}: {r['config']}" if "trial" in r else r["config"]
        kept = f"| {r['learning_rate']} | {r['model']} " if "model" in r else "| | "
        out.append(f"| {trial} {kept}| {r['trial_wall_s']:.1f} | {r['training_s']:.1f} | "
                   f"{r['overhead_s']:.2f} s = {100 * r['overhead_share']:.1f}% | {r['first_epoch_tracing_s']:.2f} s "
                   f"-> {100 * r['overhead_share_strict']:.1f}% | {r['build_compile_s']:.2f} | {r['fit_setup_s']:.2f} "
                   f"| {r['test_evaluation_s']:.2f} | {r['other_s']:.2f} |")  # fmt: skip
    if not d["overhead"]:  # a memory-only run
        out = []
    if d.get("memory"):
        out += ["", memory(d)] if out else [memory(d)]
    return "\n".join(out)


def step_products(d: dict) -> str:
    out = ["| configuration | dependent products | TensorFlow us each | GFLOP/s | numpy us each | GFLOP/s "
           "| 2048x2048 GFLOP/s | share of the epoch's FLOPs | floor s | in the products s | bound s | bound / floor "
           "| with numpy's chain s | / floor |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in d["rows"]:
        out.append(f"| {r['config']} | {r['product']} | {r['tf_us_per_product']:.0f} | {r['tf_gflops']:.0f} "
                   f"| {r['numpy_us_per_product']:.0f} | {r['numpy_gflops']:.0f} | {r['matmul_2048_gflops']:.0f} "
                   f"| {100 * r['chain_share_of_flops']:.0f}% | {r['floor_s']:.2f} | {r['chain_s']:.2f} "
                   f"| {r['bound_s']:.2f} | {r['bound_ratio']:.2f} | {r['bound_numpy_s']:.2f} "
                   f"| {r['bound_numpy_ratio']:.2f} |")  # fmt: skip
    return "\n".join(out)


def fused_rnn(d: dict) -> str:
    out = ["| configuration | images | rounds | Keras's layers: median epoch s | tuner's: median epoch s | speed-up "
           "| per round | first call s (Keras's / tuner's) | Keras's rolled loop: epoch s, first call s "
           "| largest loss difference |",
           "|---|---:|---:|---:|---:|---:|---|---|---|---:|"]  # fmt: skip
    for r in d["rows"]:
        per_round = ", ".join(f"{x:.2f}" for x in r["speedup_per_round"])
        first = f"{r['first_call_s']['keras']:.2f} / {r['first_call_s']['tuner']:.2f}"
        rolled = "-"
        if r.get("speedup_vs_rolled"):
            rolled = (f"{r['median_epoch_s']['keras_rolled']:.2f} ({r['speedup_vs_rolled']:.2f}x), "
                      f"{r['first_call_s']['keras_rolled']:.2f}")  # fmt: skip
        out.append(f"| {r['config']} | {r['n_train']} | {r['rounds']} | {r['median_epoch_s']['keras']:.2f} "
                   f"| {r['median_epoch_s']['tuner']:.2f} | {r['speedup_median']:.2f}x | {per_round} | {first} "
                   f"| {rolled} | {r['max_loss_difference']:.1e} |")  # fmt: skip
    rows = [r for r in d["rows"] if r.get("numpy_speedup")]
    if rows:  # the numpy recurrence and the bound without the dependent steps (SimpleRNN, since the 14th round)
        out += ["", "| configuration | floor s | tuner's: epoch s, / floor | numpy's recurrence: epoch s, / floor "
                "| numpy's speed / tuner's | numpy's first call s | numpy's largest loss difference to tuner's "
                "| without the dependence between steps: epoch s, / floor |",
                "|---|---:|---|---|---:|---:|---:|---|"]  # fmt: skip
        for r in rows:
            m, ratio = r["median_epoch_s"], r["ratio_to_floor"]
            out.append(f"| {r['config']} | {r['floor_s']:.2f} | {m['tuner']:.2f}, {ratio['tuner']:.2f}x "
                       f"| {m['numpy']:.2f}, {ratio['numpy']:.2f}x | {r['numpy_speedup']:.2f}x "
                       f"| {r['first_call_s']['numpy']:.2f} | {r['numpy_max_loss_difference']:.1e} "
                       f"| {m['no_chain']:.2f}, {ratio['no_chain']:.2f}x |")  # fmt: skip
    rows = [r for r in d["rows"] if r.get("stepwise_speedup")]
    if rows:  # LSTM: Keras's layer (shipped) against tuner.recurrent's treatment as a lever (the 18th round on)
        out += ["", "| configuration | Keras's layer, as shipped: epoch s | the stepwise lever: epoch s "
                "| speed-up | per round | first call s (shipped / lever) | largest loss difference |",
                "|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
        for r in rows:
            m, first = r["median_epoch_s"], r["first_call_s"]
            per_round = ", ".join(f"{x:.2f}" for x in r["stepwise_per_round"])
            out.append(f"| {r['config']} | {m['tuner']:.2f} | {m['stepwise']:.2f} | {r['stepwise_speedup']:.2f}x "
                       f"| {per_round} | {first['tuner']:.2f} / {first['stepwise']:.2f} "
                       f"| {r['stepwise_max_loss_difference']:.1e} |")  # fmt: skip
    return "\n".join(out)


def ab_paths(d: dict) -> str:
    out = [f"base {d['base']} against the tree; medians of {d['rounds']} rounds",
           "", "| configuration | side | steps a call | epoch s | base's epoch over the side's | per round "
           "| first call s | figures as base's |", "|---|---|---:|---:|---:|---|---:|---|"]  # fmt: skip
    for c in d["configs"]:
        for name, s in c["sides"].items():
            per_round = ", ".join(f"{x:.2f}" for x in s["per_round"])
            out.append(f"| {c['config']} | {name} | {s['steps_per_execution']} | {s['median_s']:.3f} "
                       f"| {s['speedup']:.2f}x | {per_round} | {s['first_call_s']:.2f} "
                       f"| {'same' if s['same_figures_as_base'] else 'DIFFERENT'} |")  # fmt: skip
    if not d["configs"]:
        out = [f"base {d['base']} against the tree"]
    if d.get("searches"):
        out += ["", "| side | wall s a search, by seed | total s | base's wall over the side's (median) | per seed "
                "| trials as base's |", "|---|---|---:|---:|---|---|"]  # fmt: skip
        for name, f in d["searches"].items():
            walls = ", ".join(f"{w:.1f}" for w in f["wall_s"])
            per_seed = ", ".join(f"{x:.2f}" for x in f["per_seed"])
            same = "same" if f["same_trials_as_base"] else "DIFFERENT"
            out.append(f"| {name} | {walls} | {f['total_s']:.1f} | {f['speedup']:.2f}x | {per_seed} | {same} |")
    return "\n".join(out)


def _us_rate(row: dict, us: str, rate: str) -> str:
    return f"{row[us]:.0f} ({row[rate]:.0f})" if us in row else "-"


def recurrence_bound(d: dict) -> str:
    out = ["| configuration | floor s | shipped: median epoch s | / floor | without the dependence between steps: "
           "median epoch s | / floor | numpy's dependent products, an epoch s | best kernel s | / floor (goal <= 1.5) "
           "| per round s (shipped / without) | elementwise pass over a whole-sequence tensor us (GB/s) "
           "| input product of all steps us (GFLOP/s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        m, ratio = r["median_epoch_s"], r["ratio"]
        rounds = ", ".join(f"{a['seconds']:.2f} / {b['seconds']:.2f}"
                           for a, b in zip(r["epochs"]["shipped"], r["epochs"]["chainless"], strict=True))  # fmt: skip
        out.append(f"| {r['config']} | {r['floor_s']:.2f} | {m['shipped']:.2f} | {ratio['shipped']:.2f}x "
                   f"| {m['chainless']:.2f} | {ratio['chainless']:.2f}x | {r['numpy_chain_epoch_s']:.2f} "
                   f"| {r['best_kernel_s']:.2f} | {r['best_kernel_ratio']:.2f}x | {rounds} "
                   f"| {_us_rate(r, 'elementwise_pass_us', 'elementwise_gbytes_per_s')} "
                   f"| {_us_rate(r, 'input_product_us', 'input_product_gflops')} |")  # fmt: skip
    return "\n".join(out)


def step_profile(d: dict) -> str:
    groups = list(d["rows"][0]["groups_s"]) if d["rows"] else []
    out = ["| configuration | epoch s (/ floor) | profiled epoch s | steps | ms a step: in the train function "
           "| some op running | two at once | no op running | outside the function | "
           + " | ".join(f"ops' ms a step: {g}" for g in groups) + " | longest op a step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(groups) + "---|"]  # fmt: skip
    for r in d["rows"]:
        n = r["steps"]
        ms = {k: 1e3 * r[k] / n for k in ("profiled_epoch_s", "function_s", "ops_busy_s", "ops_both_s")}
        top = r["top_ops"][0]
        out.append(f"| {r['config']} | {r['epoch_s']:.2f} ({r['ratio']:.2f}x) | {r['profiled_epoch_s']:.2f} | {n} "
                   f"| {ms['function_s']:.2f} | {ms['ops_busy_s']:.2f} | {ms['ops_both_s']:.2f} "
                   f"| {ms['function_s'] - ms['ops_busy_s']:.2f} | {ms['profiled_epoch_s'] - ms['function_s']:.2f} | "
                   + " | ".join(f"{1e3 * r['groups_s'][g] / n:.2f}" for g in groups)
                   + f" | {top['type']} {top['name'].split('/')[-1]} {1e3 * top['s'] / n:.2f} ms |")  # fmt: skip
    return "\n".join(out)


def memory(d: dict) -> str:
    env = d.get("env") or "none set"
    out = [f"Allocator environment: {env} (the objective caps glibc's malloc arenas at 2 unless MALLOC_ARENA_MAX "
           "is set: tuner.models.limit_malloc_arenas)", ""]  # fmt: skip
    if d.get("model_cache") is not None:
        out += [f"Compiled models a worker keeps: {d['model_cache']} (5 as shipped)", ""]
    m = d["memory"]
    out.append("RSS after each trial (MiB): " + ", ".join(f"{t['rss_mib']:.0f}" for t in m["trials"]))
    out.append("")
    since = ", since the memory run began" if "peak_per_trial" in m else " (the process's, since it started)"
    out.append(f"Peak RSS (VmHWM) after each trial{since} (MiB): "
               + ", ".join(f"{t['peak_rss_mib']:.0f}" for t in m["trials"]))  # fmt: skip
    out.append("")
    if m.get("peak_per_trial"):
        peaks = ", ".join(f"{t['trial_peak_rss_mib']:.0f}" for t in m["trials"])
        out.append(f"Peak RSS during each trial (MiB): {peaks}")
        out.append("")
    for key, label in m.get("heap_labels", {}).items():  # the eleventh round on
        out += [f"{label} (MiB): " + ", ".join(f"{t[key]:.0f}" for t in m["trials"]), ""]
    out.append(f"RSS slope over the second half: {m['rss_slope_second_half_mib_per_trial']:+.1f} MiB/trial; "
               f"peak {m['peak_first_half_mib']:.0f} MiB after the first half, {m['peak_last_mib']:.0f} MiB after "
               f"the last trial.")  # fmt: skip
    if m.get("peak_per_trial"):
        out[-1] += (f" Each trial's own peak: slope over the second half "
                    f"{m['trial_peak_slope_second_half_mib_per_trial']:+.1f} MiB/trial.")  # fmt: skip
    if rep := m.get("repeat"):
        growth = ", ".join(f"{g:+.0f}" for g in rep["growth_mib"])
        out += ["", f"The second pass (the first pass's models again, in order) against the first, model for model "
                f"(MiB): {growth}; mean {rep['mean_growth_mib']:+.1f}, largest {rep['max_growth_mib']:+.0f}; highest "
                f"{rep['peak_first_pass_mib']:.0f} MiB in the first pass, {rep['peak_second_pass_mib']:.0f} in the "
                "second."]  # fmt: skip
    return "\n".join(out)


def pruning(d: dict) -> str:
    out = ["| pruner | trials | states | epochs spent | wall s | best val acc |", "|---|---:|---|---:|---:|---:|"]
    for r in d["runs"]:
        out.append(f"| {r['pruner']} | {r['trials']} | {r['states']} | {r['epochs_spent']} of {r['epochs_max']} "
                   f"| {r['wall_s']:.0f} | {100 * r['best_val_accuracy']:.2f}% |")  # fmt: skip
    out.append("")
    for s in d.get("summaries", [d["summary"]]):
        walls = "not compared" if s["wall_saved"] is None else f"{100 * s['wall_saved']:.1f}%"
        out.append(f"{s.get('pruner', 'hyperband')}: epochs saved {100 * s['epochs_saved']:.1f}%, wall time saved "
                   f"{walls}, best {s['best_gap_points']:+.2f} points behind the unpruned "
                   "search.  ")  # fmt: skip
    return "\n".join(out)


def vs_kerastuner(d: dict) -> str:
    if "table" not in d:
        return "(partial file: run `python bench/vs_kerastuner.py --from-json FILE --json FILE` to finish it)"
    out = [f"Budget about {d['budget_epochs']} epochs a run, at most {d['max_epochs']} a trial, {d['subset']} training "
           f"images; seeds {d['seeds']}. Targets: {100 * d['target']:.2f}% (the lowest best of all runs) and "
           f"{100 * d['high_target']:.2f}% (the median best).", "",
           "| method | seeds | epochs to the low target | epochs to the median target | best val acc | epochs spent "
           "| wall s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, t in d["table"].items():
        best = ", ".join(f"{100 * b:.2f}%" for b in t["best"])
        out.append(f"| {m} | {t['seeds']} | {t['epochs_to_target']} | {t['epochs_to_high_target']} | {best} "
                   f"| {t['epochs_spent']} | {', '.join(f'{w:.0f}' for w in t['wall_s'])} |")  # fmt: skip
    readings = {
        "measured": "The same targets on the best validation accuracy measured at any epoch of any trial (pruned "
        "trials included):",
        "per_epoch": "The same targets per epoch: epochs trained until the first epoch of any trial whose "
        "validation accuracy reached the target:",
    }
    for suffix, title in readings.items():
        if not all(f"epochs_to_target_{suffix}" in t for t in d["table"].values()):
            continue  # a file written before this reading existed
        out += ["", title, "", "| method | epochs to the low target | median | epochs to the median target "
                "| median |", "|---|---|---:|---|---:|"]  # fmt: skip
        for m, t in d["table"].items():
            low, high = f"epochs_to_target_{suffix}", f"epochs_to_high_target_{suffix}"
            out.append(f"| {m} | {t[low]} | {t['median_' + low]} | {t[high]} | {t['median_' + high]} |")
    if d.get("ratios"):
        out += ["", "tuner's median epochs over KerasTuner's (goal <= 0.5; - : KerasTuner's median did not reach the "
                "target):", "", "| tuner arm / KerasTuner arm / reading | ratio |", "|---|---:|"]  # fmt: skip
        for key, ratio in d["ratios"].items():
            out.append(f"| {key} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(out)


def storage(d: dict) -> str:
    out = []
    if d.get("overhead"):
        out += ["| database | loop | sampler | trials | ms/trial mean | first 100 | last 100 |",
                "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in d["overhead"]:
            out.append(f"| {r['backend']} | {r['loop']} | {r['sampler']} | {r['trials']} "
                       f"| {r['ms_per_trial_mean']:.1f} | {r['ms_per_trial_first100']:.1f} "
                       f"| {r['ms_per_trial_last100']:.1f} |")  # fmt: skip
        out.append("")
    if d.get("reads"):
        out += ["| database | trials in the study | ms a read, one worker | ms a read, a trial unfinished since "
                "the middle |", "|---|---:|---:|---:|"]  # fmt: skip
        out += [f"| {r['backend']} | {r['trials']:,} | {r['ms_per_read']:.3f} "
                f"| {r['ms_per_read_older']:.3f} |" if "ms_per_read_older" in r else
                f"| {r['backend']} | {r['trials']:,} | {r['ms_per_read']:.3f} | - |" for r in d["reads"]]  # fmt: skip
        out.append("")
    if d.get("against"):  # this checkout's tuner against another's, in turns (storage.py --against)
        a = d["against"]
        out += [f"This checkout ({a['this_commit']}) against {a['other_commit']}, median of {a['rounds']}:",
                "", "| database | sampler | trials a run | ms a trial, this | ms a trial, the other | speed-up "
                "| per round (the other over this) |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in a["summary"]:
            mine = [x for x in a["runs"] if x["backend"] == r["backend"] and x["sampler"] == r["sampler"]]
            per_round = ", ".join(
                f"{o['ms_per_trial_mean'] / t['ms_per_trial_mean']:.2f}"
                for t, o in zip([x for x in mine if x["code"] == "this"], [x for x in mine if x["code"] == "other"])
            )
            out.append(f"| {r['backend']} | {r['sampler']} | {r['trials']} | {r['this_ms']:.2f} | {r['other_ms']:.2f} "
                       f"| {r['speedup']:.2f}x | {per_round} |")  # fmt: skip
        out.append("")
    if not d.get("workers"):
        return "\n".join(out)
    out += ["| loop | workers | trials | elapsed s | ideal s | share of ideal | first trial late by s "
            "| share from the first trial |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in d["workers"]:
        late = f"{r['late_start_s']:.1f}" if "late_start_s" in r else "-"
        first = f"{100 * r['share_of_ideal_from_first_trial']:.1f}%" if "late_start_s" in r else "-"
        out.append(f"| {r['loop']} | {r['workers']} | {r['trials']} | {r['elapsed_s']:.1f} | {r['ideal_s']:.1f} "
                   f"| {100 * r['share_of_ideal']:.1f}% | {late} | {first} |")  # fmt: skip
    return "\n".join(out)


# pruning results: the eighteenth (its seeds in the order run), sixteenth, fifteenth, fourteenth, thirteenth,
# eleventh and ninth rounds' checks of the default, the eighth round's default, then the fourth and fifth rounds'
# default (steps counted in epochs trained), the median pruner, the earlier default (Keras's 0-based epoch index as
# the step) and its experiments
PRUNING = ("pruning_round20_seed3", "pruning_round19_seed3", "pruning_round19_seed3_always8",
           "pruning_round18_seed3", "pruning_round18_seed4", "pruning_round18_seed0", "pruning_round18_seed1",
           "pruning_round18_seed2",
           "pruning_round16_seed0", "pruning_round16_seed1", "pruning_round16_seed2", "pruning_round16_seed0_before",
           "pruning_round15_seed0", "pruning_round15_seed1",
           "pruning_round14_seed0", "pruning_round14_seed1",
           "pruning_round13_seed0", "pruning_round13_seed1",
           "pruning_round13_seed2", "pruning_round13_seed3", "pruning_round13_seed4",
           "pruning_round11_seed0", "pruning_round11_seed1", "pruning_round11_seed2", "pruning_round11_seed3",
           "pruning_round11_seed4", "pruning_round9_seed0", "pruning_round9_seed1", "pruning_round9_seed2",
           "pruning_round9_seed3",
           "pruning_round9_seed4", "pruning_round8_seed0", "pruning_round8_seed1", "pruning_round8_seed2",
           "pruning_round8_seed3", "pruning_round8_seed4", "pruning_epochs_seed0", "pruning_epochs_seed1",
           "pruning_epochs_seed2", "pruning_epochs_seed3", "pruning_epochs_seed4", "pruning_median_seed0",
           "pruning_median_seed1", "pruning_median_seed2", "pruning_median_seed3", "pruning_median_seed4",
           "pruning_percentile33_seed0", "pruning_percentile33_seed1",
           "pruning_percentile33_seed2", "pruning_rf2_epochs_seed0", "pruning_rf2_epochs_seed1",
           "pruning_rf2_epochs_seed2", "pruning", "pruning_seed1", "pruning_seed2",
           "pruning_rf4_seed0", "pruning_rf4_seed1")  # fmt: skip


# every results file, newest round first, with the function that prints its table
RESULTS = (("vs_kerastuner_round20", vs_kerastuner), ("ab_paths_round20_final", ab_paths),
           ("train_speed_goal_round20", train_speed), ("trial_overhead_round20", trial_overhead),
           ("ab_paths_round20_lstm_gated", ab_paths), ("ab_paths_round20_unfused", ab_paths),
           ("ab_paths_round20_unfused_b", ab_paths),
           ("train_speed_goal_round20_before", train_speed), ("trial_overhead_round20_before", trial_overhead),
           ("storage_round20", storage), ("train_speed_onednn_round20", train_speed),
           ("fused_rnn_lstm_round20", fused_rnn), ("step_profile_lstm_round20", step_profile),
           ("ab_paths_round20", ab_paths), ("ab_paths_round20_lstm", ab_paths),
           ("ab_paths_round19", ab_paths), ("ab_search_round19", ab_paths),
           ("ab_search_round19_439f0bb", ab_paths), ("ab_search_round19_always8", ab_paths),
           ("train_speed_goal_round19", train_speed), ("ab_paths_round19b", ab_paths),
           ("train_speed_goal_round19_f64metric", train_speed),
           ("trial_overhead_round19", trial_overhead), ("trial_overhead_round19_always8", trial_overhead),
           ("vs_kerastuner_round19", vs_kerastuner),
           ("storage_round19", storage),
           ("train_speed_goal_round18", train_speed), ("trial_overhead_round18", trial_overhead),
           ("storage_round18", storage), ("step_products_round18", step_products), ("fused_rnn_round18", fused_rnn),
           ("vs_kerastuner_round18", vs_kerastuner), ("train_speed_levers_round18", train_speed),
           ("trial_memory_round18", trial_overhead), ("step_profile_lstm_round18", step_profile),
           ("train_speed_goal_round17", train_speed), ("trial_overhead_round17", trial_overhead),
           ("storage_round17", storage), ("step_products_round17", step_products),
           ("storage_round17b", storage), ("storage_against_round17", storage),
           ("fused_rnn_round17", fused_rnn), ("trial_memory_round17", trial_overhead),
           ("train_speed_goal_round16", train_speed), ("step_profile_round16", step_profile),
           ("train_speed_goal_round16_before", train_speed), ("step_products_round16", step_products),
           ("recurrence_bound_round16", recurrence_bound), ("trial_overhead_round16", trial_overhead),
           ("storage_round16", storage), ("trial_memory_round16", trial_overhead),
           ("step_profile_round16_before", step_profile), ("vs_kerastuner_round16", vs_kerastuner),
           ("train_speed_levers_round16", train_speed),
           ("train_speed_goal_round15", train_speed), ("step_products_round15", step_products),
           ("recurrence_bound_round15", recurrence_bound), ("trial_overhead_round15", trial_overhead),
           ("storage_round15", storage), ("trial_memory_round15", trial_overhead),
           ("vs_kerastuner_round15", vs_kerastuner), ("train_speed_levers_round15", train_speed),
           ("recurrence_bound_round15b", recurrence_bound), ("train_speed_xla_gru_round15", train_speed),
           ("train_speed_goal_round14", train_speed), ("step_products_round14", step_products),
           ("fused_rnn_numpy_round14", fused_rnn), ("recurrence_bound_round14", recurrence_bound),
           ("fused_rnn_round14", fused_rnn), ("trial_overhead_round14", trial_overhead),
           ("storage_round14", storage), ("recurrence_bound_round14b", recurrence_bound),
           ("vs_kerastuner_round14", vs_kerastuner), ("trial_memory_round14", trial_overhead),
           ("storage_round13b", storage), ("storage_round13b_before", storage), ("storage_round13", storage),
           ("storage_round13_before", storage), ("train_speed_goal_round13", train_speed),
           ("step_products_round13", step_products), ("trial_overhead_round13", trial_overhead),
           ("trial_memory_round13", trial_overhead),
           ("fused_rnn_round13", fused_rnn), ("vs_kerastuner_round13", vs_kerastuner),
           ("storage_round12b", storage), ("storage_round12", storage), ("storage_round12_ee152c9", storage),
           ("storage_round12_before", storage), ("storage_reads_round12_before", storage),
           ("train_speed_goal_round11", train_speed), ("train_speed_bf16_round11", train_speed),
           ("fused_rnn_round11", fused_rnn), ("step_products_round11", step_products),
           ("trial_overhead_round11", trial_overhead), ("trial_memory_round11", trial_overhead),
           ("trial_memory_cache0_round11", trial_overhead),
           ("storage_round11", storage), ("vs_kerastuner_round11", vs_kerastuner),
           ("train_speed_goal_round10", train_speed),
           ("train_speed_onednn_env1_round10", train_speed),
           ("train_speed_onednn_unset_round10", train_speed), ("train_speed_onednn_unsetb_round10", train_speed),
           ("train_speed_onednn_env1b_round10", train_speed), ("fused_rnn_round10", fused_rnn),
           ("step_products_round10", step_products), ("trial_overhead_round10", trial_overhead),
           ("trial_memory_round10", trial_overhead), ("trial_memory_onednn_unset_round10", trial_overhead),
           ("trial_memory_cap160_round10", trial_overhead), ("storage_round10", storage),
           ("train_speed_goal_round9", train_speed), ("train_speed_goal_round9b", train_speed),
           ("fused_rnn_round9", fused_rnn), ("step_products_round9", step_products),
           ("trial_overhead_round9", trial_overhead), ("trial_overhead_round9b", trial_overhead),
           ("trial_memory_round9", trial_overhead), ("trial_memory40x2_round9", trial_overhead),
           ("trial_memory100x2_round9", trial_overhead), ("trial_memory40_round9", trial_overhead),
           ("trial_memory40_round9b", trial_overhead), ("storage_round9", storage),
           ("vs_kerastuner_round9", vs_kerastuner), ("train_speed_goal_round8", train_speed),
           ("fused_rnn_onekernelgrad_round8", fused_rnn), ("fused_rnn_round8", fused_rnn),
           ("fused_rnn_simplernn_round8", fused_rnn), ("step_products_round8", step_products),
           ("trial_overhead_round8", trial_overhead), ("storage_round8", storage),
           ("vs_kerastuner_round8", vs_kerastuner), ("train_speed", train_speed), ("train_speed_xla_full", train_speed),
           ("train_speed_fused", train_speed), ("train_speed_goal", train_speed),
           ("train_speed_goal_xeon", train_speed), ("train_speed_xeon", train_speed), ("fused_rnn_first", fused_rnn),
           ("fused_rnn", fused_rnn),
           ("fused_rnn_simplernn", fused_rnn), ("fused_rnn_gru", fused_rnn), ("step_products", step_products),
           ("trial_overhead", trial_overhead), ("trial_overhead_xeon", trial_overhead),
           *((name, pruning) for name in PRUNING), ("vs_kerastuner", vs_kerastuner), ("storage", storage),
           ("storage_xeon", storage), ("storage_workers", storage))  # fmt: skip


# each round's machine as its section of BENCHMARKS.md describes it (`lscpu` read by hand before the 15th round,
# whose files record the family, vector units and L3 cache themselves)
KINDS = {8: "Intel Xeon, AVX-512", 9: "AMD EPYC, family 26, AVX-512", 10: "AMD EPYC, family 25, AVX2",
         11: "Intel Xeon, AVX-512, AMX", 12: "AMD EPYC, family 25, AVX2", 13: "AMD EPYC, family 25, AVX-512",
         14: "AMD EPYC, family 25, AVX-512"}  # fmt: skip


def _kind(folder: Path, n: int) -> str:
    for name in (f"train_speed_goal_round{n}.machine", f"storage_round{n}", f"trial_overhead_round{n}"):
        d = _load(folder, name) or {}
        m = d.get("machine", d)
        if m.get("cpu_family"):
            isa = ", ".join(i.upper() for i in m["vector_isa"] if i in ("avx2", "avx512f", "amx_tile"))
            isa = isa.replace("AVX512F", "AVX-512").replace("AMX_TILE", "AMX")
            model = f" model {m['cpu_model']}" if m.get("cpu_model") else ""
            return f"{m['cpu']}, family {m['cpu_family']}{model}, {isa}, L3 {m['l3_cache']}"
    return KINDS.get(n, "?")


def _goal1(d: list | None) -> str:
    rows = [r for r in d or [] if r["variant"] == "shipped"]
    return " / ".join(f"{r['ratio']:.2f}" for r in rows) if rows else "-"


def _goal2a(d: dict | None) -> str:
    rows = [r for r in (d or {}).get("overhead", []) if r.get("model")]
    return " / ".join(f"{100 * r['overhead_share']:.1f}%" for r in rows) if rows else "-"


def _goal3(folder: Path, n: int) -> str:
    out = []
    for seed in range(5):
        d = _load(folder, f"pruning_round{n}_seed{seed}")
        if d:
            s = d.get("summaries", [d.get("summary")])[0]
            out.append(f"{seed}: {100 * s['epochs_saved']:.1f}%, {s['best_gap_points']:+.2f}")
    return "; ".join(out) or "-"


def _goal4(d: dict | None) -> str:
    ratios = (d or {}).get("ratios") or {}
    arm = "tuner search (TPE + successive-halving, document start) / KerasTuner {} / epochs_to_target"
    found = [ratios.get(arm.format(name)) for name in ("Hyperband", "BayesianOptimization")]
    return " / ".join(f"{r:.2f}" for r in found if r is not None) or "-"


def _goal5(d: dict | None) -> tuple[str, str]:
    d = d or {}
    ms = {r["backend"]: r["ms_per_trial_last100"] for r in d.get("overhead", [])
          if r["loop"] == "tuner" and r["sampler"] == "tpe"}  # fmt: skip
    eight = [r["share_of_ideal"] for r in d.get("workers", []) if r["loop"] == "tuner" and r["workers"] == 8]
    a = f"{ms['sqlite']:.1f} / {ms['postgresql']:.1f}" if {"sqlite", "postgresql"} <= ms.keys() else "-"
    return a, f"{100 * eight[0]:.1f}%" if eight else "-"


def goals(folder: Path) -> str:
    """One row a round from the eighth on: each goal's figure from the round's main file of that benchmark."""
    out = ["| round | machine | 1. shipped epoch / floor, SimpleRNN / LSTM / GRU (<= 1.5) "
           "| 2a. outside the epochs: built / kept SimpleRNN-128, built / kept LSTM-128 (<= 2%) "
           "| 2b. second pass over first, mean MiB (no growth) | 3. seed: epochs saved, best behind by points "
           "(>= 60%, <= 0.2) | 4. epochs to the low target over Hyperband's / BayesianOptimization's (<= 0.5) "
           "| 5a. ms a trial at 1,000, SQLite / PostgreSQL (<= 20) | 5b. 8 workers (>= 90%) |",
           "|---:|---|---|---|---:|---|---|---|---:|"]  # fmt: skip
    for n in range(99, 7, -1):
        files = {name: _load(folder, f"{name}_round{n}") for name in
                 ("train_speed_goal", "trial_overhead", "trial_memory", "vs_kerastuner", "storage")}  # fmt: skip
        if not any(files.values()) and not _load(folder, f"pruning_round{n}_seed0"):
            continue
        memory = files["trial_memory"] or files["trial_overhead"] or {}  # the memory-only run, else the full one's
        repeat = memory.get("memory", {}).get("repeat")
        growth = f"{repeat['mean_growth_mib']:+.1f}" if repeat else "-"
        a, b = _goal5(files["storage"])
        out.append(f"| {n} | {_kind(folder, n)} | {_goal1(files['train_speed_goal'])} "
                   f"| {_goal2a(files['trial_overhead'])} | {growth} | {_goal3(folder, n)} "
                   f"| {_goal4(files['vs_kerastuner'])} | {a} | {b} |")  # fmt: skip
    return "\n".join(out)


def machine(folder: Path) -> str:
    out = ["| benchmark | CPU | family (model from the 16th round), vector units, L3 (from the 15th) | cores "
           "| memory GiB "
           "| TensorFlow | Keras | Optuna | load average (1 min) at start |",
           "|---|---|---|---:|---:|---|---|---|---:|"]  # fmt: skip
    for name, fn in RESULTS:
        d = _load(folder, f"{name}.machine" if fn is train_speed else name)  # train_speed keeps it beside its rows
        if d is None:
            continue
        m = d.get("machine", d)
        family = f"{m['cpu_family']} model {m['cpu_model']}" if m.get("cpu_model") else m.get("cpu_family")
        kind = f"{family}, {' '.join(m['vector_isa'])}, {m['l3_cache']}" if m.get("cpu_family") else "-"
        out.append(f"| {name} | {m.get('cpu')} | {kind} | {m.get('cores')} | {m.get('memory_gib')} "
                   f"| {m.get('tensorflow')} | {m.get('keras')} | {m.get('optuna')} "
                   f"| {m.get('load_average_1min'):.1f} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results"))
    print(f"### goals by round\n\n{goals(folder)}\n")
    print(f"### machine\n\n{machine(folder)}\n")
    for name, fn in RESULTS:
        d = _load(folder, name)
        if d is not None:
            print(f"### {name}\n\n{fn(d)}\n")


if __name__ == "__main__":
    main()
