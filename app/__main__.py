"""The `medzero` command:

    medzero serve [--demo]                                   the HTTP server
    medzero kb build                                         (re)build the description index for the model
    medzero kb generate --label-set NAME [-n N]              ask an LLM for more descriptions per class
    medzero kpl fit --label-set NAME --images DIR            fit KPL proxies offline; the server uses them
    medzero eval --label-set NAME --data DIR|CSV [--url URL] measure every method on labelled images
    medzero calibrate --label-set NAME --data DIR --method M temperature + conformal prediction sets
    medzero train meduna --label-set NAME --images DIR --out DIR   MedUnA adapter + prompt tokens, offline
    medzero train hica --label-set NAME --shots DIR --out DIR      HiCA few-shot adaptation, offline
    medzero keys create --name NAME --scope classify|admin | list | revoke ID     API keys (hashed in the database)
    medzero bundle export --out FILE [--label-sets a,b] [--with-index] [--with-state]   the model (+ corpus...)
    medzero bundle verify FILE | import FILE [--force]        check offline / unpack it for an air-gapped site
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from app.errors import InvalidInput, MedzeroError
from app.methods.hica_config import AlignConfig, PreAdaptConfig, TuningConfig
from app.methods.meduna_config import ImageStageConfig, TextStageConfig
from app.settings import Settings

log = logging.getLogger("medzero")
# arguments that steer a command rather than configure medzero (everything else maps onto a Settings field)
COMMAND_ARGUMENTS = {"command", "kb_command", "kpl_command", "label_set", "n_per_class", "no_progress", "images",
                     "class_prior", "data", "methods", "kpl_balancings", "no_transductive", "mapping", "out", "url",
                     "api_key", "batch_files", "http_timeout", "abstain_threshold", "seed", "bootstrap", "method",
                     "split", "coverage", "conformal_share", "train_command", "resume", "force",
                     *(f"text_{name}" for name in ("steps", "lr", "weight_decay", "noise_std")),
                     "prompt_tokens", "epochs", "batch_size", "lr", "momentum", "weight_decay", "ce_weight",
                     "entropy_weight", "selection", "smoothing", "lr_decay", "lr_milestones", "text_betas",
                     "text_eps", "crop_scale", "color_jitter", "color_jitter_p", "grayscale_p", "blur_sigma",
                     "shots", "shots_per_class", "tuning", "tuned_blocks", "lora_rank", "lora_alpha", "text_lr",
                     "clusters_per_class", "clusters", "pre_epochs", "cluster_temperature", "text_temperature",
                     "global_weight", "local_weight", "cross_weight", "global_temperature", "local_temperature",
                     "margin", "grid", "keys_command", "name", "scope", "key_id", "bundle_command", "bundle",
                     "label_sets", "with_index", "no_knowledge_base", "with_state"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medzero", description="Zero-shot medical image classification.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--demo", action="store_true",
                       help="serve the tiny bundled model when the configured weights are not on this machine")
    serve.add_argument("--host", help="bind address (MEDZERO_HOST)")
    serve.add_argument("--port", type=int, help="port (MEDZERO_PORT)")
    add_model_arguments(serve)

    kb = commands.add_parser("kb", help="the description knowledge base")
    kb_commands = kb.add_subparsers(dest="kb_command", required=True)
    build = kb_commands.add_parser("build", help="embed every description with the model's text tower and write "
                                                 "its FAISS index (data_dir/kb/<model>/)")
    add_model_arguments(build)
    build.add_argument("--knowledge-base-dir", help="corpus folder (MEDZERO_KNOWLEDGE_BASE_DIR)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate = kb_commands.add_parser(
        "generate", help="ask an LLM (MEDZERO_LLM_URL, MEDZERO_LLM_MODEL) for more descriptions per class and "
                         "append them to knowledge_base/<label set>.json")
    generate.add_argument("--label-set", required=True, help="a registered or built-in label set")
    generate.add_argument("-n", "--per-class", dest="n_per_class", type=int, default=10,
                          help="descriptions to ask for per class (1-100)")
    generate.add_argument("--llm-url", help="OpenAI-compatible base URL, e.g. http://localhost:8001/v1")
    generate.add_argument("--llm-model", help="model the endpoint serves (MEDZERO_LLM_MODEL)")
    generate.add_argument("--knowledge-base-dir", help="corpus folder (MEDZERO_KNOWLEDGE_BASE_DIR)")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(generate)

    kpl = commands.add_parser("kpl", help="knowledge proxy learning")
    kpl_commands = kpl.add_subparsers(dest="kpl_command", required=True)
    fit = kpl_commands.add_parser("fit", help="fit KPL proxies for a label set on a folder of unlabelled images")
    fit.add_argument("--label-set", required=True)
    fit.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    fit.add_argument("--kpl-balancing", choices=["reference", "sinkhorn"], help="MEDZERO_KPL_BALANCING")
    fit.add_argument("--class-prior", type=class_prior_argument, metavar="CLASS=WEIGHT,...",
                     help="expected class shares for the balancing, e.g. normal=0.7,pneumonia=0.3 (default uniform)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(fit)

    evaluate = commands.add_parser(
        "eval", help="measure methods on labelled images: accuracy, balanced accuracy, macro-F1, AUROC, calibration "
                     "(ECE, Brier, NLL), bootstrap intervals, abstention; writes results.json, results.md, plots")
    add_labelled_data_arguments(evaluate)
    evaluate.add_argument("--methods", type=comma_list, help="comma-separated (default: every method the service "
                                                               "has), e.g. zeroshot,kpl")
    evaluate.add_argument("--kpl-balancing", dest="kpl_balancings", type=comma_list, default=["reference", "sinkhorn"],
                          help="balancing readings for the transductive kpl rows, side by side")
    evaluate.add_argument("--no-transductive", action="store_true",
                          help="no transductive rows (methods fitted on the evaluation pool itself)")
    evaluate.add_argument("--out", type=Path, default=Path("eval-results"), help="output folder")
    evaluate.add_argument("--url", help="measure a running server (e.g. http://127.0.0.1:8000) instead of "
                                        "loading the model here")
    evaluate.add_argument("--api-key", help="X-API-Key for --url, if the server needs one")
    evaluate.add_argument("--batch-files", type=int, default=32, help="--url: files per /classify/batch request")
    evaluate.add_argument("--http-timeout", type=float, default=600.0,
                          help="--url: seconds to wait for one batch (a transductive fit on a big pool is slow)")
    evaluate.add_argument("--abstain-threshold", type=float, help="top probability below which a decision is "
                                                                  "'uncertain' (default: the label set's)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals")
    add_model_arguments(evaluate)

    calibrate = commands.add_parser(
        "calibrate", help="fit a temperature and a conformal prediction-set threshold for one method of a label "
                          "set on labelled images; /classify then returns calibrated probabilities")
    add_labelled_data_arguments(calibrate)
    calibrate.add_argument("--method", required=True, help="the method to calibrate, e.g. zeroshot or kpl")
    calibrate.add_argument("--split", type=float, default=0.5,
                           help="share of the images used to calibrate; the rest is held back to report on")
    calibrate.add_argument("--conformal-share", type=float, default=0.5,
                           help="share of the calibration images for the conformal threshold (the rest fit the "
                                "temperature)")
    calibrate.add_argument("--coverage", type=float, default=0.9, help="target coverage of the prediction sets")
    calibrate.add_argument("--seed", type=int, default=0, help="split seed")
    add_model_arguments(calibrate)

    train = commands.add_parser("train", help="offline training jobs whose results the server loads")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    meduna = train_commands.add_parser(
        "meduna", help="MedUnA: an adapter trained on the label set's descriptions, refined with visual prompt "
                       "tokens on unlabelled images; writes adapter.safetensors + manifest.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    meduna.add_argument("--label-set", required=True)
    meduna.add_argument("--images", required=True, type=Path, help="unlabelled images (searched recursively)")
    meduna.add_argument("--out", required=True, type=Path, help="output folder (checkpoints go in out/checkpoints)")
    meduna.add_argument("--seed", type=int, default=0)
    meduna.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    meduna.add_argument("--force", action="store_true", help="replace an adapter already in --out")
    text, image = TextStageConfig(), ImageStageConfig()
    meduna.add_argument("--text-steps", type=int, default=text.steps, help="stage 1 AdamW steps")
    meduna.add_argument("--text-lr", type=float, default=text.lr)
    meduna.add_argument("--text-weight-decay", type=float, default=text.weight_decay)
    meduna.add_argument("--text-noise-std", type=float, default=text.noise_std,
                        help="Gaussian noise added to the description embeddings each step")
    meduna.add_argument("--smoothing", type=float, default=text.smoothing, help="label smoothing, both stages")
    meduna.add_argument("--prompt-tokens", type=int, default=image.n_prompt_tokens)
    meduna.add_argument("--epochs", type=int, default=image.epochs, help="stage 2 epochs")
    meduna.add_argument("--batch-size", type=int, default=image.batch_size)
    meduna.add_argument("--lr", type=float, default=image.lr, help="stage 2 SGD learning rate")
    meduna.add_argument("--momentum", type=float, default=image.momentum)
    meduna.add_argument("--weight-decay", type=float, default=image.weight_decay)
    meduna.add_argument("--ce-weight", type=float, default=image.ce_weight)
    meduna.add_argument("--entropy-weight", type=float, default=image.entropy_weight)
    meduna.add_argument("--selection", type=float, default=image.selection,
                        help="share of each batch's most confident rows in the entropy term")
    meduna.add_argument("--lr-decay", type=float, default=image.lr_decay, help="MultiStepLR gamma")
    meduna.add_argument("--lr-milestones", type=comma_ints, default=list(image.lr_milestones),
                        help="epochs at which the rate decays (the reference passes none: constant)")
    meduna.add_argument("--text-betas", type=comma_floats, default=list(text.betas), help="AdamW betas")
    meduna.add_argument("--text-eps", type=float, default=text.eps, help="AdamW eps")
    meduna.add_argument("--crop-scale", type=comma_floats, default=list(image.crop_scale),
                        help="strong view: RandomResizedCrop scale range")
    meduna.add_argument("--color-jitter", type=comma_floats, default=list(image.color_jitter),
                        help="strong view: brightness,contrast,saturation,hue")
    meduna.add_argument("--color-jitter-p", type=float, default=image.color_jitter_p)
    meduna.add_argument("--grayscale-p", type=float, default=image.grayscale_p)
    meduna.add_argument("--blur-sigma", type=comma_floats, default=list(image.blur_sigma),
                        help="strong view: Gaussian blur sigma range (always applied)")
    meduna.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(meduna)
    add_hica_parser(train_commands)

    keys = commands.add_parser("keys", help="API keys: create (shown once), list, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="a new key; prints it once (only its hash is stored)")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. 'pacs-gateway'")
    create.add_argument("--scope", required=True, choices=["classify", "admin"],
                        help="classify: classify and read results; admin: also label sets, adapters, fits, routes")
    list_keys = key_commands.add_parser("list", help="every key: id, name, scope, created, revoked")
    revoke = key_commands.add_parser("revoke", help="revoke a key at once (its id, from `keys list`)")
    revoke.add_argument("key_id", metavar="ID")
    for sub in (create, list_keys, revoke):
        sub.add_argument("--data-dir", help="where the database lives (MEDZERO_DATA_DIR)")
    add_bundle_parser(commands)
    return parser


def add_bundle_parser(commands) -> None:
    bundle = commands.add_parser("bundle", help="air-gapped model bundles: export, verify, import")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    export = bundle_commands.add_parser(
        "export", help="write the model this machine serves (weights, tokenizer, text-tower config), the "
                       "description corpus and optionally its index and label sets into one .tar or .tar.zst")
    export.add_argument("--out", type=Path, required=True, help="the bundle file (.tar, or .tar.zst: zstd)")
    export.add_argument("--label-sets", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        help="comma-separated label sets to include (default: every one not built in)")
    export.add_argument("--with-index", action="store_true", help="include the built FAISS description index")
    export.add_argument("--no-knowledge-base", action="store_true", help="leave the description corpus out")
    export.add_argument("--with-state", action="store_true", help="include the label sets' learned state under "
                        "this model: KPL fits, MedUnA / HiCA adapters, few-shot support sets, calibrations")
    export.add_argument("--knowledge-base-dir", help="corpus folder (MEDZERO_KNOWLEDGE_BASE_DIR)")
    export.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(export)
    export.add_argument("--model", dest="model_name", help="the same as --model-name")
    verify = bundle_commands.add_parser("verify", help="check hashes and manifest, and build the model offline "
                                                       "from the bundle alone; prints its table of contents")
    verify.add_argument("bundle", type=Path, metavar="FILE")
    imported = bundle_commands.add_parser("import", help="verify, then unpack into the data dir atomically and "
                                                         "register its label sets; prints the settings to serve it")
    imported.add_argument("bundle", type=Path, metavar="FILE")
    imported.add_argument("--force", action="store_true", help="replace a different bundle of the same model "
                                                               "or label sets of the same names")
    imported.add_argument("--data-dir", help="where to unpack it (MEDZERO_DATA_DIR)")
    imported.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_hica_parser(train_commands) -> None:
    hica = train_commands.add_parser(
        "hica", help="HiCA: few-shot hierarchical contrastive adaptation of the image tower and a text projection; "
                     "writes adapter.safetensors + manifest.json (method=hica)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hica.add_argument("--label-set", required=True)
    hica.add_argument("--shots", required=True, type=Path,
                      help="labelled images: a folder with one sub-folder per class, or a CSV with path,label")
    hica.add_argument("--shots-per-class", type=int,
                      help="draw this many shots per class (with --seed) and report on the rest; default: all")
    hica.add_argument("--images", type=Path, help="unlabelled site images for stage 1 (default: the shots)")
    hica.add_argument("--out", required=True, type=Path, help="output folder (checkpoints go in out/checkpoints)")
    hica.add_argument("--seed", type=int, default=0)
    hica.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    hica.add_argument("--force", action="store_true", help="replace an adapter already in --out")
    tuning, pre, align = TuningConfig(), PreAdaptConfig(), AlignConfig()
    hica.add_argument("--tuning", choices=["lora", "blocks"], default=tuning.mode,
                      help="LoRA on the attention weights of the last blocks, or every weight of those blocks")
    hica.add_argument("--tuned-blocks", type=int, default=tuning.blocks, help="how many of the last blocks")
    hica.add_argument("--lora-rank", type=int, default=tuning.lora_rank)
    hica.add_argument("--lora-alpha", type=float, default=tuning.lora_alpha, help="update = alpha / rank * B A")
    hica.add_argument("--lr", type=float, default=tuning.lr, help="AdamW rate of the tower parameters")
    hica.add_argument("--text-lr", type=float, default=tuning.text_lr, help="AdamW rate of the text projection")
    hica.add_argument("--weight-decay", type=float, default=tuning.weight_decay)
    hica.add_argument("--clusters-per-class", type=int, default=pre.clusters_per_class,
                      help="stage 1: k-means k = classes x this")
    hica.add_argument("--clusters", type=int, help="stage 1: k-means k (overrides --clusters-per-class)")
    hica.add_argument("--pre-epochs", type=int, default=pre.epochs, help="stage 1: passes over the images")
    hica.add_argument("--cluster-temperature", type=float, default=pre.cluster_temperature)
    hica.add_argument("--text-steps", type=int, default=pre.text_steps, help="stage 1: text projection steps")
    hica.add_argument("--text-temperature", type=float, default=pre.text_temperature)
    hica.add_argument("--epochs", type=int, default=align.epochs, help="stage 2 epochs over the shots")
    hica.add_argument("--batch-size", type=int, default=align.batch_size)
    hica.add_argument("--global-weight", type=float, default=align.global_weight)
    hica.add_argument("--local-weight", type=float, default=align.local_weight)
    hica.add_argument("--cross-weight", type=float, default=align.cross_weight)
    hica.add_argument("--global-temperature", type=float,
                      help="default: the model's own 1 / logit scale (HiCA starts as zero-shot)")
    hica.add_argument("--local-temperature", type=float, default=align.local_temperature)
    hica.add_argument("--margin", type=float, default=align.margin, help="hard-negative cosine margin")
    hica.add_argument("--grid", type=int, default=align.grid, help="local regions: a grid x grid tiling")
    hica.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(hica)


def comma_ints(text: str) -> list[int]:
    return [int(part) for part in comma_list(text)]


def comma_floats(text: str) -> list[float]:
    return [float(part) for part in comma_list(text)]


def add_labelled_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-set", required=True)
    parser.add_argument("--data", required=True, type=Path,
                        help="labelled images: a folder with one sub-folder per class, or a CSV with path,label")
    parser.add_argument("--map", dest="mapping", action="append", default=[], metavar="FOLDER=CLASS",
                        help="a folder (or CSV label) name that differs from its class name; repeat or comma-separate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", help="open_clip model id (MEDZERO_MODEL_NAME)")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint path (MEDZERO_PRETRAINED)")
    parser.add_argument("--data-dir", help="where the database and indexes live (MEDZERO_DATA_DIR)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items()
                 if key not in COMMAND_ARGUMENTS and value not in (None, False)}
    try:
        settings = Settings(**overrides)
    except ValueError as exc:   # pydantic's ValidationError names the bad MEDZERO_ variable
        print(f"medzero: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve_forever(settings)
    if args.command == "keys":
        return manage_keys(settings, args)
    if args.command == "bundle":
        return manage_bundle(settings, args)
    progress = not args.no_progress
    try:
        if args.command == "kb" and args.kb_command == "build":
            from app.jobs import build_index
            print(json.dumps(build_index.main(settings, progress=progress), indent=2))
        elif args.command == "kb" and args.kb_command == "generate":
            from app.jobs import generate_descriptions
            print(generate_descriptions.main(settings, args.label_set, args.n_per_class, progress=progress).render())
        elif args.command == "kpl" and args.kpl_command == "fit":
            from app.jobs import fit_kpl
            print(render_fit(fit_kpl.main(settings, args.label_set, args.images, progress=progress,
                                          class_prior=args.class_prior)))
        elif args.command == "eval":
            from app.evaluation.dataset import parse_mapping
            from app.jobs import evaluate
            options = evaluate.EvalOptions(methods=tuple(args.methods) if args.methods else None,
                                           kpl_balancings=tuple(args.kpl_balancings),
                                           transductive=not args.no_transductive,
                                           abstain_threshold=args.abstain_threshold, seed=args.seed,
                                           n_bootstrap=args.bootstrap, progress=progress,
                                           http_batch_files=args.batch_files, http_timeout_seconds=args.http_timeout)
            evaluate.main(settings, args.data, args.label_set, args.out, mapping=parse_mapping(args.mapping),
                          options=options, url=args.url, api_key=args.api_key)
            print((args.out / "results.md").read_text())
            print(f"wrote {args.out}/results.json, results.md and plots")
        elif args.command == "train" and args.train_command == "meduna":
            from app.jobs import train_meduna
            print(render_meduna(train_meduna.main(settings, args.label_set, args.images, args.out,
                                                  config=meduna_config(args), resume=args.resume, force=args.force,
                                                  progress=progress)))
        elif args.command == "train" and args.train_command == "hica":
            from app.jobs import train_hica
            print(render_hica(train_hica.main(settings, args.label_set, args.shots, args.out, images_dir=args.images,
                                              shots_per_class=args.shots_per_class, config=hica_config(args),
                                              resume=args.resume, force=args.force, progress=progress)))
        elif args.command == "calibrate":
            from app.evaluation.dataset import parse_mapping
            from app.jobs import calibrate
            from app.services.calibration import CalibrationSplit
            report = calibrate.main(settings, args.label_set, args.data, args.method, coverage=args.coverage,
                                    split=CalibrationSplit(args.split, args.conformal_share, args.seed),
                                    mapping=parse_mapping(args.mapping), progress=progress)
            print(render_calibration(report))
    except MedzeroError as exc:
        print(f"medzero {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def manage_bundle(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from app.bundles import model_bundle
    try:
        if args.bundle_command == "export":
            manifest = asyncio.run(model_bundle.export_bundle(
                settings, args.out, label_sets=args.label_sets, with_index=args.with_index,
                with_knowledge_base=not args.no_knowledge_base, with_state=args.with_state,
                progress=not args.no_progress))
            print(model_bundle.table_of_contents(manifest))
            print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes); on the target: medzero bundle import "
                  f"{args.out.name}")
        elif args.bundle_command == "verify":
            report = model_bundle.verify_bundle(args.bundle)
            print(model_bundle.table_of_contents(report["manifest"]))
            print(f"OK: hashes match, and the model builds offline from the bundle alone (embedding dimension "
                  f"{report['check']['embed_dim']}, {report['check']['seconds']} s)")
        else:
            imported = asyncio.run(model_bundle.import_bundle(settings, args.bundle, force=args.force,
                                                              progress=not args.no_progress))
            print(f"{'already there' if imported.already_there else 'imported'}: {imported.folder}"
                  + (f"; label sets {', '.join(imported.label_sets)}" if imported.label_sets else "")
                  + ("; description index in place" if imported.index else "")
                  + (f"; {imported.states} learned state(s) stored" if imported.states else ""))
            print("serve it with:")
            print(f"  MEDZERO_MODEL_NAME={imported.model_name}")
            if imported.knowledge_base_dir:
                print(f"  MEDZERO_KNOWLEDGE_BASE_DIR={imported.knowledge_base_dir}")
            print(f"  MEDZERO_DATA_DIR={settings.data_dir}")
    except MedzeroError as exc:
        print(f"medzero bundle {args.bundle_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def class_prior_argument(text: str) -> dict[str, float]:
    from app.api.schemas import parse_class_prior
    try:
        return parse_class_prior(text)
    except MedzeroError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def render_fit(report) -> str:
    fit = report.fit
    lines = [f"KPL fit v{fit.version} of {fit.label_set} v{fit.label_set_version} under {fit.model_id}: "
             f"{fit.pool_size} images, {fit.fit_seconds:.1f} s, balancing={fit.config.get('balancing')}",
             "pseudo-label balance: " + ", ".join(f"{k} {v:.0%}" for k, v in fit.class_balance.items())]
    for class_name, entries in zip(fit.class_names, fit.evidence):
        lines.append(f"  {class_name}: " + "; ".join(e.text for e in entries[:3]))
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} files: "
                     + ", ".join(f"{name} ({error.code})" for name, error in report.skipped[:5]))
    return "\n".join(lines)


def meduna_config(args: argparse.Namespace):
    from app.jobs.train_meduna import MedUnAConfig
    for option, expected in (("text_betas", 2), ("crop_scale", 2), ("color_jitter", 4), ("blur_sigma", 2)):
        if len(getattr(args, option)) != expected:
            raise InvalidInput(f"--{option.replace('_', '-')} takes {expected} comma-separated numbers; got "
                               f"{getattr(args, option)}")
    text = TextStageConfig(steps=args.text_steps, lr=args.text_lr, betas=tuple(args.text_betas), eps=args.text_eps,
                           weight_decay=args.text_weight_decay, noise_std=args.text_noise_std,
                           smoothing=args.smoothing)
    image = ImageStageConfig(n_prompt_tokens=args.prompt_tokens, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                             ce_weight=args.ce_weight, entropy_weight=args.entropy_weight, selection=args.selection,
                             smoothing=args.smoothing, lr_decay=args.lr_decay,
                             lr_milestones=tuple(args.lr_milestones), crop_scale=tuple(args.crop_scale),
                             color_jitter=tuple(args.color_jitter), color_jitter_p=args.color_jitter_p,
                             grayscale_p=args.grayscale_p, blur_sigma=tuple(args.blur_sigma))
    return MedUnAConfig(text=text, image=image, seed=args.seed)


def render_meduna(report) -> str:
    manifest = report.manifest
    stage1, stage2 = manifest["metrics"]["stage1"], manifest["metrics"]["stage2"]
    lines = [f"MedUnA adapter for {manifest['label_set']} v{manifest['label_set_version']} under "
             f"{manifest['model_id']} -> {report.out_dir}",
             f"stage 1: loss {stage1['first_loss']:.4f} -> {stage1['final_loss']:.4f}, train accuracy on "
             f"descriptions {stage1['train_accuracy']:.1%}, {stage1['seconds']:.1f} s",
             "stage 2 epoch | loss | CE | entropy | seconds", "--:|--:|--:|--:|--:"]
    lines += [f"{e['epoch']} | {e['loss']:.4f} | {e['ce']:.4f} | {e['entropy']:.4f} | {e['seconds']:.1f}"
              for e in stage2["epochs"]]
    labelled = manifest["metrics"]["labelled_accuracy"]
    if labelled:
        lines.append(f"labelled accuracy on {labelled['images']} images: zeroshot {labelled['zeroshot']:.1%}, "
                     f"stage 1 {labelled['stage1']:.1%}, stage 2 {labelled['stage2']:.1%}")
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} files: " + ", ".join(f for f, _ in report.skipped[:5]))
    return "\n".join(lines)


def hica_config(args: argparse.Namespace):
    from app.jobs.train_hica import HiCAConfig
    for option in ("tuned_blocks", "lora_rank", "epochs", "pre_epochs", "batch_size", "grid", "clusters_per_class"):
        if getattr(args, option) < 1:
            raise InvalidInput(f"--{option.replace('_', '-')} must be at least 1; got {getattr(args, option)}")
    if args.clusters is not None and args.clusters < 1:
        raise InvalidInput(f"--clusters must be at least 1; got {args.clusters}")
    for option in ("global_temperature", "local_temperature", "cluster_temperature", "text_temperature"):
        if getattr(args, option) is not None and not getattr(args, option) > 0:
            raise InvalidInput(f"--{option.replace('_', '-')} must be positive; got {getattr(args, option)}")
    tuning = TuningConfig(mode=args.tuning, blocks=args.tuned_blocks, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lr=args.lr, text_lr=args.text_lr,
                          weight_decay=args.weight_decay)
    pre = PreAdaptConfig(clusters_per_class=args.clusters_per_class, clusters=args.clusters, epochs=args.pre_epochs,
                         batch_size=args.batch_size, cluster_temperature=args.cluster_temperature,
                         text_steps=args.text_steps, text_temperature=args.text_temperature)
    align = AlignConfig(epochs=args.epochs, batch_size=args.batch_size, global_weight=args.global_weight,
                        local_weight=args.local_weight, cross_weight=args.cross_weight,
                        global_temperature=args.global_temperature, local_temperature=args.local_temperature,
                        margin=args.margin, grid=args.grid)
    return HiCAConfig(tuning=tuning, pre=pre, align=align, seed=args.seed)


def render_hica(report) -> str:
    manifest = report.manifest
    stage1, stage2 = manifest["metrics"]["stage1"], manifest["metrics"]["stage2"]
    text, clusters = stage1["text"], stage1["clusters"]
    lines = [f"HiCA adapter for {manifest['label_set']} v{manifest['label_set_version']} under "
             f"{manifest['model_id']} -> {report.out_dir}",
             f"shots: " + ", ".join(f"{name} {n}" for name, n in manifest["images"]["shots"].items())
             + f"; {manifest['images']['unlabelled']} unlabelled images for stage 1",
             f"stage 1: {clusters['k']} k-means clusters; pseudo-label loss "
             + " -> ".join(f"{e['loss']:.4f}" for e in stage1["cluster_epochs"])
             + (f"; text SupCon {text['first_loss']:.4f} -> {text['final_loss']:.4f}" if text["first_loss"] else ""),
             "stage 2 epoch | loss | global | local | hard negative | separation | seconds",
             "--:|--:|--:|--:|--:|--:|--:"]
    lines += [f"{e['epoch']} | {e['loss']:.4f} | {e['global']:.4f} | {e['local']:.4f} | {e['hard_negative']:.4f} "
              f"| {e['separation']:.4f} | {e['seconds']:.1f}" for e in stage2["epochs"]]
    for part, accuracy in manifest["metrics"]["accuracy"].items():
        what = "shots" if part == "shots" else "held-out images"
        lines.append(f"accuracy on the {accuracy['images']} {what}: zeroshot {accuracy['zeroshot']:.1%}, hica "
                     f"{accuracy['hica']:.1%}")
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} files: " + ", ".join(f for f, _ in report.skipped[:5]))
    return "\n".join(lines)


def manage_keys(settings: Settings, args: argparse.Namespace) -> int:
    from app.storage.api_keys import ApiKeyRepository
    from app.storage.db import create_db_engine
    keys = ApiKeyRepository(create_db_engine(settings.resolved_database_url,
                                             busy_timeout_ms=settings.db_busy_timeout_ms))
    try:
        if args.keys_command == "create":
            key, token = keys.create(args.name, args.scope)
            print(f"created key {key.id} ({key.name}, scope {args.scope}); it is shown only now:\n{token}")
        elif args.keys_command == "list":
            print("id | name | scope | created | revoked\n---|---|---|---|---")
            for key in keys.list():
                print(f"{key.id} | {key.name} | {','.join(key.scopes)} | {key.created_at:%Y-%m-%d %H:%M} | "
                      f"{f'{key.revoked_at:%Y-%m-%d %H:%M}' if key.revoked_at else '-'}")
        else:
            key = keys.revoke(args.key_id)
            print(f"revoked key {key.id} ({key.name})")
    except MedzeroError as exc:
        print(f"medzero keys {args.keys_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def render_calibration(report) -> str:
    c = report.calibration
    before, after, sets = c.report["before"], c.report["after"], c.report["prediction_sets"]
    lines = [f"calibration v{c.version} of {c.method} for {c.label_set} v{c.label_set_version} under {c.model_id}: "
             f"temperature {c.temperature:.4f}; prediction sets for {c.coverage:.0%} coverage (LAC): classes with "
             f"p >= {c.set_threshold:.4f}",
             f"images: {c.images['temperature']} fit the temperature, {c.images['conformal']} the set threshold, "
             f"{c.images['held_back']} held back",
             "", "held-back images | ECE | NLL | Brier | accuracy", "---|--:|--:|--:|--:"]
    for name, quality in (("before", before), ("after", after)):
        lines.append(f"{name} | {quality['ece']:.4f} | {quality['nll']:.4f} | {quality['brier']:.4f} "
                     f"| {quality['accuracy']:.1%}")
    lines += ["", f"prediction sets on the held-back images: coverage {sets['coverage']:.1%} "
                  f"(target {c.coverage:.0%}), mean size {sets['mean_size']:.2f}, empty {sets['empty']:.1%}"]
    lines += [f"WARNING: {warning}" for warning in c.report.get("warnings", [])]
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} files: "
                     + ", ".join(f"{name} ({error.code})" for name, error in report.skipped[:5]))
    return "\n".join(lines)


def serve_forever(settings: Settings) -> int:
    import uvicorn

    from app.logs import logging_config
    from app.main import create_app

    failure: list[MedzeroError] = []

    def stop_on_failure(exc: MedzeroError) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(settings, on_startup_failure=stop_on_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=logging_config(settings.log_level, settings.log_format),
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        print(f"medzero: cannot start: {failure[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
