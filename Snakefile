# The CPAL pipeline for Snakemake. dvc.yaml declares the same stages with the same commands
# (tests/test_engines.py checks that they agree).
#
#   snakemake --cores 2                 # embedded default, project environment
#   snakemake --cores 8 --use-conda     # conda users: every rule runs in environment.yml
#   snakemake --cores 2 --configfile configs/tiny.yaml   # a preset merged over params.yaml

import sys

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate  # noqa: E402

from cpal.config import validate_params, write_resolved_params  # noqa: E402


configfile: "params.yaml"


validate(config, "cpal/params.schema.json")
validate_params(config, source="Snakemake config (params.yaml + overrides)")

# Stages read their params from a file: the merged config (params.yaml plus any --config/--configfile
# overrides) is written here, rewritten only when its content changes, so every stage sees exactly what
# was validated above. dvc.yaml passes params.yaml itself; the commands are otherwise identical.
# Reruns follow the `params:` of each rule (whole sections, as dvc.yaml declares them).
PARAMS = write_resolved_params(config, "outputs/params.snakemake.yaml")
DATA = config["data"]["dir"]
ENV = "environment.yml"


rule all:
    input:
        "results/dataset_samples.png",
        "results/eval_seeds.json",
    default_target: True


rule data:
    output:
        directory(DATA),
    params:
        params_file=PARAMS,
        data=config["data"],
        run=config["run"],
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
        "results/dataset_samples.png",
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
        gpu=1 if config["run"]["device"] == "cuda" else 0,
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
        curve="results/eval_seeds_curve.csv",
        plot="results/eval_seeds_curve.png",
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
