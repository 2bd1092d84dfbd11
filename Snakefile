# The CPAL pipeline for Snakemake: one rule per stage module. dvc.yaml and hosts/dvc.yaml declare the same
# stages with the same commands (tests/test_engines.py checks that they agree).
#
#   snakemake --cores 2                 # embedded default, project environment
#   snakemake --cores 8 --use-conda     # conda users: every rule runs in environment.yml
#   snakemake --cores 2 --configfile configs/tiny.yaml   # a preset merged over params.yaml
#   snakemake --cores 2 all results/eval_irn.json        # the default targets plus the IRN branch
#
# The default target `all` needs the classifier's maps through the CRF and DeepLab on their pseudo-masks (and on
# ground truth, the upper bound). The IRN and AMN branches run when a target asks for one of their outputs, or
# when pseudo.source names their maps: the rules are the same, on another host's maps (HOSTS below).

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
PARAMS = write_resolved_params(config, "outputs/params.snakemake.yaml",
                               ["params.yaml", *(os.path.relpath(f) for f in workflow.overwrite_configfiles)])
DATA = config["data"]["dir"]
ENV = "environment.yml"
GPU = 1 if config["run"]["device"] == "cuda" else 0
DDP_GPUS = config["run"].get("nproc_per_node", 1) * GPU  # DDP: one GPU per process


def sections(*names, **keys):
    """A rule's params: the merged config's file, whole sections of it and, as ``section=(key, ...)``, the keys of a
    section it reads (as dvc.yaml declares them), so that a changed key reruns the rules that read it."""
    return {"params_file": PARAMS, **{"method" if name == "params" else name: config[name] for name in names},
            **{section: {key: config[section][key] for key in ks} for section, ks in keys.items()}}


# The irn keys each IRN stage reads (cpal.irn.labels.LABEL_KEYS, cpal.irn.train.TRAIN_KEYS, cpal.irn.refine.REFINE_KEYS;
# tests/test_engines.py holds them equal to hosts/dvc.yaml's): a change to the walk does not retrain IRN.
IRN_LABEL_KEYS = ("map", "fg_threshold", "bg_threshold", "label_crf", "labels")
IRN_TRAIN_KEYS = ("backbone_from", "radius", "crop", "batch_size", "epochs", "lr", "momentum", "weight_decay",
                  "poly_power", "amp")
IRN_REFINE_KEYS = ("map", "walk_radius", "beta", "exp_times", "sem_seg_bg_thres", "power", "flip", "walk", "boundaries")


# A host is a network whose seed maps the shared rules (eval_seeds, refine_crf, ir_labels, train_irn, refine_irn,
# eval_pseudo) evaluate and refine; its outputs carry its prefix (outputs/amn_crf/maps), the {host} wildcard.
# cls, the classifier of params.method, is the default path; amn is AMN (train_amn, make_amn_seeds) on cls's IR
# labels. AMN's seed files hold one map (cam), and its protocol adds a fixed seed threshold. hosts/dvc.yaml
# declares the same table.
HOSTS = {
    "cls": dict(prefix="", seeds="outputs/seeds/maps", map="", protocol=""),
    "amn": dict(prefix="amn_", seeds="outputs/amn/maps", map=" --map cam",
                protocol=f" --fixed-threshold {config['amn']['seed_threshold']} --host amn"),
}
REFINERS = ("crf", "irn")


def host(prefix):
    """The host whose outputs carry ``prefix``. The wildcard takes any prefix, so that a target naming an unknown
    host stops here, before any job, with the hosts there are."""
    for entry in HOSTS.values():
        if entry["prefix"] == prefix:
            return entry
    known = ", ".join(f"{name} ({entry['prefix'] or 'no prefix'})" for name, entry in HOSTS.items())
    raise ValueError(f"no host writes outputs with the prefix {prefix!r}; the hosts are {known}")


def masks(wildcards):
    """eval_pseudo's input: the pseudo-masks, or a host's CRF or IRN maps (results/eval_amn_crf.json)."""
    if wildcards.masks == "pseudo":
        return "outputs/pseudo/labels"
    host(next(wildcards.masks.removesuffix(step) for step in REFINERS if wildcards.masks.endswith(step)))
    return f"outputs/{wildcards.masks}/maps"


# DeepLab trains on the pseudo-masks (seg) and on the dataset's ground truth, in its folder (seg_full: the upper
# bound): the labels it reads, and how the stage is told.
TRAIN_ON = {"seg": ("outputs/pseudo/labels", "--labels outputs/pseudo/labels"), "seg_full": (DATA, "--ground-truth")}


wildcard_constraints:
    host=r"(?:[a-z0-9]+_)?",
    masks=r"pseudo|(?:[a-z0-9]+_)?(?:" + "|".join(REFINERS) + ")",
    seg="|".join(TRAIN_ON),


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
    output: directory(DATA)
    params: **sections("data", "run"), source_state=SOURCE_STATE
    log: "outputs/logs/data.log"
    threads: 1
    resources: mem_mb=2000
    conda: ENV
    shell: "python -m stages.data --params {params.params_file} --out {output} --log {log}"


rule dataset_figure:
    input: data=DATA
    output: report("results/dataset_samples.png", caption="report/dataset_samples.rst", category="Data")
    params: **sections("data")
    log: "outputs/logs/dataset_figure.log"
    threads: 1
    resources: mem_mb=1000
    conda: ENV
    shell: "python -m stages.dataset_figure --params {params.params_file} --data {input.data} --out {output} --log {log}"


rule train_cls:
    input: data=DATA
    output: model="outputs/train_cls/model.pt", metrics="outputs/train_cls/metrics.json",
            timing="outputs/train_cls/timing.json"
    params: **sections("params", "data", "train_cls", "run")
    log: "outputs/logs/train_cls.log"
    threads: 2
    resources: mem_mb=4000, gpu=DDP_GPUS
    conda: ENV
    shell: "python -m stages.train_cls --params {params.params_file} --data {input.data} --out outputs/train_cls --log {log}"


rule make_seeds:
    input: data=DATA, model="outputs/train_cls/model.pt"
    output: seeds=directory("outputs/seeds/maps"), timing="outputs/seeds/timing.json"
    params: **sections("params", "train_cls", "seeds", "run")
    log: "outputs/logs/make_seeds.log"
    threads: 2
    resources: mem_mb=4000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.make_seeds --params {params.params_file} --data {input.data} "
        "--checkpoint {input.model} --out {output.seeds} --timing {output.timing} --log {log}"


rule eval_seeds:
    input: data=DATA, seeds=lambda w: host(w.host)["seeds"]
    output:
        metrics="results/eval_{host}seeds.json",
        curve=report("results/eval_{host}seeds_curve.csv", caption="report/eval_seeds_table.rst", category="Seeds"),
        plot=report("results/eval_{host}seeds_curve.png", caption="report/eval_seeds_curve.rst", category="Seeds"),
    params: **sections("params", "seeds"), protocol=lambda w: host(w.host)["protocol"]
    log: "outputs/logs/eval_{host}seeds.log"
    threads: 1
    resources: mem_mb=2000
    conda: ENV
    shell:
        "python -m stages.eval_seeds --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--metrics {output.metrics} --curve {output.curve} --plot {output.plot}{params.protocol} --log {log}"


rule refine_crf:
    input: data=DATA, seeds=lambda w: host(w.host)["seeds"]
    output: maps=directory("outputs/{host}crf/maps"), timing="outputs/{host}crf/timing.json"
    params: **sections("params", "seeds", "crf"), map=lambda w: host(w.host)["map"]
    log: "outputs/logs/refine_{host}crf.log"
    threads: 2
    resources: mem_mb=3000
    conda: ENV
    shell:
        "python -m stages.refine_crf --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.maps} --workers {threads} --timing {output.timing}{params.map} --log {log}"


rule ir_labels:
    input: data=DATA, seeds=lambda w: host(w.host)["seeds"]
    output: labels=directory("outputs/{host}irn/ir_labels")
    params: **sections("params", "seeds", irn=IRN_LABEL_KEYS), map=lambda w: host(w.host)["map"]
    log: "outputs/logs/{host}ir_labels.log"
    threads: 2
    resources: mem_mb=3000
    conda: ENV
    shell:
        "python -m stages.ir_labels --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--out {output.labels} --workers {threads}{params.map} --log {log}"


rule train_irn:
    input: data=DATA, labels="outputs/{host}irn/ir_labels", classifier="outputs/train_cls/model.pt"
    output: model="outputs/{host}irn/model.pt", metrics="outputs/{host}irn/metrics.json",
            timing="outputs/{host}irn/timing.json"
    params: **sections("params", "data", "train_cls", "seeds", "run", irn=IRN_TRAIN_KEYS)
    log: "outputs/logs/train_{host}irn.log"
    threads: 2
    resources: mem_mb=4000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.train_irn --params {params.params_file} --data {input.data} --ir-labels {input.labels} "
        "--classifier {input.classifier} --out outputs/{wildcards.host}irn --log {log}"


rule refine_irn:
    input: data=DATA, seeds=lambda w: host(w.host)["seeds"], model="outputs/{host}irn/model.pt"
    output: maps=directory("outputs/{host}irn/maps"), timing="outputs/{host}irn/refine_timing.json"
    params: **sections("params", "seeds", "run", irn=IRN_REFINE_KEYS), map=lambda w: host(w.host)["map"]
    log: "outputs/logs/refine_{host}irn.log"
    threads: 2
    resources: mem_mb=4000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.refine_irn --params {params.params_file} --data {input.data} --seeds {input.seeds} "
        "--irn {input.model} --out {output.maps} --timing {output.timing}{params.map} --log {log}"


# eval_pseudo scores a host's CRF or IRN maps under their own name, and the pseudo-masks under pseudo.source.
rule eval_pseudo:
    input: data=DATA, masks=masks
    output: metrics="results/eval_{masks}.json"
    params: **sections("params", "seeds"),
            label=lambda w: config["pseudo"]["source"] if w.masks == "pseudo" else w.masks
    log: "outputs/logs/eval_{masks}.log"
    threads: 1
    resources: mem_mb=2000
    conda: ENV
    shell:
        "python -m stages.eval_pseudo --params {params.params_file} --data {input.data} --pseudo {input.masks} "
        "--label {params.label} --metrics {output.metrics} --log {log}"


rule train_amn:
    input: data=DATA, labels="outputs/irn/ir_labels"
    output: model="outputs/amn/model.pt", metrics="outputs/amn/metrics.json", timing="outputs/amn/timing.json"
    params: **sections("params", "seeds", "amn", "run")
    log: "outputs/logs/train_amn.log"
    threads: 2
    resources: mem_mb=4000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.train_amn --params {params.params_file} --data {input.data} --ir-labels {input.labels} "
        "--out outputs/amn --log {log}"


rule make_amn_seeds:
    input: data=DATA, model="outputs/amn/model.pt", labels="outputs/irn/ir_labels"
    output: maps=directory("outputs/amn/maps"), timing="outputs/amn/seed_timing.json"
    params: **sections("params", "seeds", "amn", "run")
    log: "outputs/logs/make_amn_seeds.log"
    threads: 2
    resources: mem_mb=4000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.make_amn_seeds --params {params.params_file} --data {input.data} "
        "--checkpoint {input.model} --ir-labels {input.labels} --out {output.maps} --timing {output.timing} "
        "--log {log}"


rule pseudo_labels:
    input: data=DATA, source=f"outputs/{config['pseudo']['source']}/maps"
    output: labels=directory("outputs/pseudo/labels")
    params: **sections("params", "seeds", "pseudo")
    log: "outputs/logs/pseudo_labels.log"
    threads: 1
    resources: mem_mb=2000
    conda: ENV
    shell:
        "python -m stages.pseudo_labels --params {params.params_file} --data {input.data} "
        "--source-dir {input.source} --out {output.labels} --log {log}"


rule train_seg:
    input: data=DATA, labels=lambda w: TRAIN_ON[w.seg][0]
    output: model="outputs/{seg}/model.pt", metrics="outputs/{seg}/metrics.json", timing="outputs/{seg}/timing.json"
    params: **sections("data", "seg", "run"), labels=lambda w: TRAIN_ON[w.seg][1]
    log: "outputs/logs/train_{seg}.log"
    threads: 2
    resources: mem_mb=4000, gpu=DDP_GPUS
    conda: ENV
    shell:
        "python -m stages.train_seg --params {params.params_file} --data {input.data} {params.labels} "
        "--out outputs/{wildcards.seg} --log {log}"


rule eval_seg:
    input: data=DATA, model="outputs/{seg}/model.pt"
    output: metrics="results/eval_{seg}.json"
    params: **sections("seg", "run")
    log: "outputs/logs/eval_{seg}.log"
    threads: 2
    resources: mem_mb=3000, gpu=GPU
    conda: ENV
    shell:
        "python -m stages.eval_seg --params {params.params_file} --data {input.data} --checkpoint {input.model} "
        "--metrics {output.metrics} --log {log}"


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
    params: **sections("params", "seeds", "seg", "report", "run")
    log: "outputs/logs/report.log"
    threads: 1
    resources: mem_mb=2000
    conda: ENV
    shell:
        "python -m stages.report --params {params.params_file} --data {input.data} --results results "
        "--logs outputs/logs --seeds {input.seeds} --pseudo {input.pseudo} --seg {input.seg} --out {output.md} "
        "--gallery {output.gallery} --log {log}"
