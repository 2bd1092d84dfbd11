# The CPAL pipeline for Snakemake. dvc.yaml declares the same stages with the same commands
# (tests/test_engines.py checks that they agree).
#
#   snakemake --cores 2                 # embedded default, project environment
#   snakemake --cores 8 --use-conda     # conda users: every rule runs in environment.yml
#   snakemake --cores 2 --configfile configs/tiny.yaml   # a preset merged over params.yaml

import os
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate  # noqa: E402

from cpal.core.config import check_splits, validate_params, write_resolved_params  # noqa: E402
from cpal.core.runtime import hold_run_lock  # noqa: E402
from cpal.core.slurm import check_job_partitions  # noqa: E402
from cpal.data.sources import check_source  # noqa: E402


configfile: "params.yaml"


# `snakemake --report report.html` (after a run): Snakemake's self-contained report of the outputs marked
# with report() below, each with its caption from report/.
report: "report/workflow.rst"


validate(config, "cpal/params.schema.json")
validate_params(config, source="Snakemake config (params.yaml + overrides)")
check_splits(config, source="Snakemake config (params.yaml + overrides)")  # a split the data source does not write

# data.source folder: the photo folder, tags CSV and masks are checked now, before any job (an error names the
# CSV line and the file); their fingerprint is a param of rule data, so editing them reruns it. DVC cannot
# see them: after editing your folder or CSV run `dvc repro -f data` there.
SOURCE_STATE = check_source(config["data"])

# Stages read their params from a file: the merged config (params.yaml plus any --config/--configfile
# overrides) is written here, rewritten only when its content changes, so every stage sees exactly what
# was validated above. dvc.yaml passes params.yaml itself; the commands are otherwise identical.
# Reruns follow the `params:` of each rule (whole sections, as dvc.yaml declares them).
PARAMS = write_resolved_params(config, "outputs/params.snakemake.yaml",
                               ["params.yaml", *(os.path.relpath(f) for f in workflow.overwrite_configfiles)])
DATA = config["data"]["dir"]
REFINED = {"seeds": "outputs/seeds/maps", "crf": "outputs/crf/maps", "irn": "outputs/irn/maps",
           "amn_crf": "outputs/amn_crf/maps", "amn_irn": "outputs/amn_irn/maps"}
ENV = "environment.yml"


# Snakemake's own lock is not atomic: two runs started together can both take it. This flock is; it is
# taken before the first job of a real run (never by -n, --unlock or --dag) and dropped when this
# process ends.
# On SLURM (--executor slurm, profiles/slurm*): every partition the run's jobs ask for must exist (sinfo),
# or the run stops here naming it and the rules asking for it, before any sbatch (docs/cluster.md).
onstart:
    hold_run_lock(".snakemake/cpal-run.lock")
    if workflow.executor_plugin is not None and workflow.executor_plugin.name == "slurm":
        check_job_partitions(workflow.dag.needrun_jobs())


rule all:
    input:
        "results/dataset_samples.png",
        "results/report.md",
        "results/gallery.html",
    default_target: True


rule data:
    output:
        directory(DATA),
    params:
        params_file=PARAMS,
        data=config["data"],
        run=config["run"],
        source_state=SOURCE_STATE,
    log:
        "outputs/logs/data.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.data --params {params.params_file} --out {output} --log {log}"


rule dataset_figure:
    input:
        data=DATA,
    output:
        report("results/dataset_samples.png", caption="report/dataset_samples.rst", category="Data"),
    params:
        params_file=PARAMS,
        data=config["data"],
    log:
        "outputs/logs/dataset_figure.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python -m stages.dataset_figure --params {params.params_file} --data {input.data} --out {output} --log {log}"


rule train_cls:
    input:
        data=DATA,
    output:
        model="outputs/train_cls/model.pt",
        metrics="outputs/train_cls/metrics.json",
        timing="outputs/train_cls/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        data=config["data"],
        train_cls=config["train_cls"],
        run=config["run"],
    log:
        "outputs/logs/train_cls.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=config["run"].get("nproc_per_node", 1) if config["run"]["device"] == "cuda" else 0,  # DDP: one GPU per process
    conda:
        ENV
    shell:
        "python -m stages.train_cls --params {params.params_file} --data {input.data} "
        "--out outputs/train_cls --log {log}"


rule make_seeds:
    input:
        data=DATA,
        model="outputs/train_cls/model.pt",
    output:
        seeds=directory("outputs/seeds/maps"),
        timing="outputs/seeds/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        train_cls=config["train_cls"],
        seeds=config["seeds"],
        run=config["run"],
    log:
        "outputs/logs/make_seeds.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.make_seeds --params {params.params_file} --data {input.data} "
        "--checkpoint {input.model} --out {output.seeds} --timing {output.timing} --log {log}"


rule eval_seeds:
    input:
        data=DATA,
        seeds="outputs/seeds/maps",
    output:
        metrics="results/eval_seeds.json",
        curve=report("results/eval_seeds_curve.csv", caption="report/eval_seeds_table.rst", category="Seeds"),
        plot=report("results/eval_seeds_curve.png", caption="report/eval_seeds_curve.rst", category="Seeds"),
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
    log:
        "outputs/logs/eval_seeds.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_seeds --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--metrics {output.metrics} --curve {output.curve} --plot {output.plot} --log {log}"


rule refine_crf:
    input:
        data=DATA,
        seeds="outputs/seeds/maps",
    output:
        maps=directory("outputs/crf/maps"),
        timing="outputs/crf/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        crf=config["crf"],
    log:
        "outputs/logs/refine_crf.log",
    threads: 2
    resources:
        mem_mb=3000,
    conda:
        ENV
    shell:
        "python -m stages.refine_crf --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.maps} --workers {threads} --timing {output.timing} --log {log}"


rule eval_crf:
    input:
        data=DATA,
        maps="outputs/crf/maps",
    output:
        metrics="results/eval_crf.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
    log:
        "outputs/logs/eval_crf.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.maps} "
        "--label crf --metrics {output.metrics} --log {log}"


rule pseudo_labels:
    input:
        data=DATA,
        source=REFINED[config["pseudo"]["source"]],
    output:
        labels=directory("outputs/pseudo/labels"),
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        pseudo=config["pseudo"],
    log:
        "outputs/logs/pseudo_labels.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.pseudo_labels --params {params.params_file} --data {input.data} "
        "--source-dir {input.source} --out {output.labels} --log {log}"


rule eval_pseudo:
    input:
        data=DATA,
        labels="outputs/pseudo/labels",
    output:
        metrics="results/eval_pseudo.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        pseudo=config["pseudo"],
    log:
        "outputs/logs/eval_pseudo.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.labels} "
        "--metrics {output.metrics} --log {log}"


rule train_seg:
    input:
        data=DATA,
        labels="outputs/pseudo/labels",
    output:
        model="outputs/seg/model.pt",
        metrics="outputs/seg/metrics.json",
        timing="outputs/seg/timing.json",
    params:
        params_file=PARAMS,
        data=config["data"],
        seg=config["seg"],
        run=config["run"],
    log:
        "outputs/logs/train_seg.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=config["run"].get("nproc_per_node", 1) if config["run"]["device"] == "cuda" else 0,  # DDP: one GPU per process
    conda:
        ENV
    shell:
        "python -m stages.train_seg --params {params.params_file} --data {input.data} --labels {input.labels} "
        "--out outputs/seg --log {log}"


rule eval_seg:
    input:
        data=DATA,
        model="outputs/seg/model.pt",
    output:
        metrics="results/eval_seg.json",
    params:
        params_file=PARAMS,
        seg=config["seg"],
        run=config["run"],
    log:
        "outputs/logs/eval_seg.log",
    threads: 2
    resources:
        mem_mb=3000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.eval_seg --params {params.params_file} --data {input.data} --checkpoint {input.model} "
        "--metrics {output.metrics} --log {log}"


rule train_seg_full:
    input:
        data=DATA,
    output:
        model="outputs/seg_full/model.pt",
        metrics="outputs/seg_full/metrics.json",
        timing="outputs/seg_full/timing.json",
    params:
        params_file=PARAMS,
        data=config["data"],
        seg=config["seg"],
        run=config["run"],
    log:
        "outputs/logs/train_seg_full.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=config["run"].get("nproc_per_node", 1) if config["run"]["device"] == "cuda" else 0,  # DDP: one GPU per process
    conda:
        ENV
    shell:
        "python -m stages.train_seg --params {params.params_file} --data {input.data} --ground-truth "
        "--out outputs/seg_full --log {log}"


rule eval_seg_full:
    input:
        data=DATA,
        model="outputs/seg_full/model.pt",
    output:
        metrics="results/eval_seg_full.json",
    params:
        params_file=PARAMS,
        seg=config["seg"],
        run=config["run"],
    log:
        "outputs/logs/eval_seg_full.log",
    threads: 2
    resources:
        mem_mb=3000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.eval_seg --params {params.params_file} --data {input.data} --checkpoint {input.model} "
        "--metrics {output.metrics} --log {log}"


rule ir_labels:
    input:
        data=DATA,
        seeds="outputs/seeds/maps",
    output:
        labels=directory("outputs/irn/ir_labels"),
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        irn=config["irn"],
    log:
        "outputs/logs/ir_labels.log",
    threads: 2
    resources:
        mem_mb=3000,
    conda:
        ENV
    shell:
        "python -m stages.ir_labels --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.labels} --workers {threads} --log {log}"


rule train_irn:
    input:
        data=DATA,
        labels="outputs/irn/ir_labels",
        classifier="outputs/train_cls/model.pt",
    output:
        model="outputs/irn/model.pt",
        metrics="outputs/irn/metrics.json",
        timing="outputs/irn/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        data=config["data"],
        train_cls=config["train_cls"],
        seeds=config["seeds"],
        irn=config["irn"],
        run=config["run"],
    log:
        "outputs/logs/train_irn.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.train_irn --params {params.params_file} --data {input.data} --ir-labels {input.labels} "
        "--classifier {input.classifier} --out outputs/irn --log {log}"


rule refine_irn:
    input:
        data=DATA,
        seeds="outputs/seeds/maps",
        model="outputs/irn/model.pt",
    output:
        maps=directory("outputs/irn/maps"),
        timing="outputs/irn/refine_timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        irn=config["irn"],
        run=config["run"],
    log:
        "outputs/logs/refine_irn.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.refine_irn --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--irn {input.model} --out {output.maps} --timing {output.timing} --log {log}"


rule eval_irn:
    input:
        data=DATA,
        maps="outputs/irn/maps",
    output:
        metrics="results/eval_irn.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
    log:
        "outputs/logs/eval_irn.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.maps} "
        "--label irn --metrics {output.metrics} --log {log}"


# The AMN branch (off the default path, like IRN's): AMN trained on the classifier's IR labels,
# its maps as seeds, through the CRF. `snakemake --cores 2 results/eval_amn_crf.json` runs it;
# `pseudo.source: amn_crf` sends its masks on to DeepLab. dvc: branches/amn/dvc.yaml.
rule train_amn:
    input:
        data=DATA,
        labels="outputs/irn/ir_labels",
    output:
        model="outputs/amn/model.pt",
        metrics="outputs/amn/metrics.json",
        timing="outputs/amn/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        amn=config["amn"],
        run=config["run"],
    log:
        "outputs/logs/train_amn.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.train_amn --params {params.params_file} --data {input.data} --ir-labels {input.labels} "
        "--out outputs/amn --log {log}"


rule make_amn_seeds:
    input:
        data=DATA,
        model="outputs/amn/model.pt",
        labels="outputs/irn/ir_labels",
    output:
        maps=directory("outputs/amn/maps"),
        timing="outputs/amn/seed_timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        amn=config["amn"],
        run=config["run"],
    log:
        "outputs/logs/make_amn_seeds.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.make_amn_seeds --params {params.params_file} --data {input.data} "
        "--checkpoint {input.model} --ir-labels {input.labels} --out {output.maps} --timing {output.timing} "
        "--log {log}"


rule eval_amn_seeds:
    input:
        data=DATA,
        seeds="outputs/amn/maps",
    output:
        metrics="results/eval_amn_seeds.json",
        curve="results/eval_amn_seeds_curve.csv",
        plot="results/eval_amn_seeds_curve.png",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        threshold=config["amn"]["seed_threshold"],
    log:
        "outputs/logs/eval_amn_seeds.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_seeds --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--metrics {output.metrics} --curve {output.curve} --plot {output.plot} "
        "--fixed-threshold {params.threshold} --host amn --log {log}"


rule refine_amn_crf:
    input:
        data=DATA,
        seeds="outputs/amn/maps",
    output:
        maps=directory("outputs/amn_crf/maps"),
        timing="outputs/amn_crf/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        crf=config["crf"],
    log:
        "outputs/logs/refine_amn_crf.log",
    threads: 2
    resources:
        mem_mb=3000,
    conda:
        ENV
    shell:
        "python -m stages.refine_crf --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.maps} --workers {threads} --timing {output.timing} --map cam --log {log}"


rule eval_amn_crf:
    input:
        data=DATA,
        maps="outputs/amn_crf/maps",
    output:
        metrics="results/eval_amn_crf.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
    log:
        "outputs/logs/eval_amn_crf.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.maps} "
        "--label amn_crf --metrics {output.metrics} --log {log}"



# AMN's second pass (AMN: its maps -> IR labels -> IRN -> masks): the IRN stages again, on AMN's maps
# (`--map cam`: AMN's seed files hold one map), into outputs/amn_irn. `snakemake --cores 2
# results/eval_amn_irn.json` runs it; `pseudo.source: amn_irn` sends its masks on to DeepLab.
rule amn_ir_labels:
    input:
        data=DATA,
        seeds="outputs/amn/maps",
    output:
        labels=directory("outputs/amn_irn/ir_labels"),
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        irn=config["irn"],
    log:
        "outputs/logs/amn_ir_labels.log",
    threads: 2
    resources:
        mem_mb=3000,
    conda:
        ENV
    shell:
        "python -m stages.ir_labels --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.labels} --workers {threads} --map cam --log {log}"


rule train_amn_irn:
    input:
        data=DATA,
        labels="outputs/amn_irn/ir_labels",
        classifier="outputs/train_cls/model.pt",
    output:
        model="outputs/amn_irn/model.pt",
        metrics="outputs/amn_irn/metrics.json",
        timing="outputs/amn_irn/timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        data=config["data"],
        train_cls=config["train_cls"],
        seeds=config["seeds"],
        irn=config["irn"],
        run=config["run"],
    log:
        "outputs/logs/train_amn_irn.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.train_irn --params {params.params_file} --data {input.data} --ir-labels {input.labels} "
        "--classifier {input.classifier} --out outputs/amn_irn --log {log}"


rule refine_amn_irn:
    input:
        data=DATA,
        seeds="outputs/amn/maps",
        model="outputs/amn_irn/model.pt",
    output:
        maps=directory("outputs/amn_irn/maps"),
        timing="outputs/amn_irn/refine_timing.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        irn=config["irn"],
        run=config["run"],
    log:
        "outputs/logs/refine_amn_irn.log",
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1 if config["run"]["device"] == "cuda" else 0,
    conda:
        ENV
    shell:
        "python -m stages.refine_irn --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--irn {input.model} --out {output.maps} --timing {output.timing} --map cam --log {log}"


rule eval_amn_irn:
    input:
        data=DATA,
        maps="outputs/amn_irn/maps",
    output:
        metrics="results/eval_amn_irn.json",
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
    log:
        "outputs/logs/eval_amn_irn.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.maps} "
        "--label amn_irn --metrics {output.metrics} --log {log}"

rule report:
    input:
        data=DATA,
        seeds_eval="results/eval_seeds.json",
        crf_eval="results/eval_crf.json",
        pseudo_eval="results/eval_pseudo.json",
        seg_eval="results/eval_seg.json",
        full_eval="results/eval_seg_full.json",
        seeds="outputs/seeds/maps",
        pseudo="outputs/pseudo/labels",
        seg="outputs/seg/model.pt",
    output:
        md="results/report.md",
        csv=report("results/report.csv", caption="report/report_table.rst", category="Results"),
        bars=report("results/report_per_class.png", caption="report/per_class.rst", category="Results"),
        grid=report("results/report_grid.png", caption="report/grid.rst", category="Results"),
        gallery=report("results/gallery.html", caption="report/gallery.rst", category="Gallery"),
    params:
        params_file=PARAMS,
        method=config["params"],
        seeds=config["seeds"],
        seg=config["seg"],
        report=config["report"],
        run=config["run"],
    log:
        "outputs/logs/report.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m stages.report --params {params.params_file} --data {input.data} --results results "
        "--logs outputs/logs --seeds {input.seeds} --pseudo {input.pseudo} --seg {input.seg} --out {output.md} "
        "--gallery {output.gallery} --log {log}"
