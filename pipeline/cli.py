"""Command line: `cnn-deploy {deploy,decompose,train}`; errors print one readable line (traceback with --debug)."""

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError


def cmd_train(args) -> int:
    from calib import load_dataset
    from pipeline.train import train
    from pipeline.zoo import load_model

    spec = load_model(args.model, pretrained=False)
    result = train(spec, load_dataset("train", args.data), test_set=load_dataset("test", args.data),
                   epochs=args.epochs, seed=args.seed, out=args.out)
    print(f"{args.model}: test top-1 {result['top1']:.2%} after {args.epochs} epochs; weights in {args.out}")
    return 0


def cmd_decompose(args) -> int:
    import dataclasses

    from pipeline.atomic import write_text
    from pipeline.decompose import METHODS, decompose
    from pipeline.errors import unknown
    from pipeline.factored_io import save_factored
    from pipeline.zoo import load_model

    if args.method not in METHODS:
        raise unknown("method", args.method, METHODS)
    spec = load_model(args.model, args.weights)
    if args.budget or args.fit_samples or args.finetune_epochs:  # these need training images
        from calib import load_dataset
        from pipeline.compress import compress
        from pipeline.targets import Decomposition, Finetune

        settings = Decomposition(method=args.method, rank=args.rank, layers=tuple(args.layers),
                                 exclude=tuple(args.exclude), round_to=args.round_to, budget=args.budget or "",
                                 fit_samples=args.fit_samples if args.fit_samples is not None else Decomposition.fit_samples)
        tuning = dataclasses.replace(Finetune(), epochs=args.finetune_epochs or 0)
        result = compress(spec, load_dataset("train", args.data), settings=settings, tuning=tuning, seed=args.seed)
        model, plan = result.model, result.plan
    else:
        model, plan = decompose(spec.module, input_shape=spec.input_shape, method=args.method, rank=args.rank,
                                layers=tuple(args.layers), exclude=tuple(args.exclude), round_to=args.round_to,
                                seed=args.seed)
    print(plan.table())
    if args.out:
        save_factored(args.out, model, plan, model_name=spec.name)
        write_text(Path(args.out).with_suffix(".plan.json"), plan.to_json())
        print(f"factored model: {args.out}; plan: {Path(args.out).with_suffix('.plan.json')}")
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench import bench
    from pipeline.errors import ConfigError

    if len(args.epochs) not in (1, len(args.models)):
        raise ConfigError(f"--epochs got {len(args.epochs)} counts for {len(args.models)} models; expected one, "
                          "or one per model")
    epochs = args.epochs[0] if len(args.epochs) == 1 else dict(zip(args.models, args.epochs, strict=True))
    path = bench(models=tuple(args.models), budgets=tuple(args.budgets), epochs=epochs, target=args.target,
                 data=args.data, eval_samples=args.eval_samples, out=args.out, latency_rounds=args.latency_rounds)
    print(f"results: {path}; report: {path.with_name('report.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnn-deploy", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a zoo model from scratch on CIFAR-10")
    p.add_argument("--model", default="seednet")
    p.add_argument("--data", help="CIFAR-10 folder or .npz (default: search, see README)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the state dict")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("decompose", help="factor a model's conv and linear layers; print and save the plan")
    p.add_argument("--model", default="seednet", help="zoo name or package.module:callable")
    p.add_argument("--weights", help="state-dict checkpoint (default: the zoo's)")
    p.add_argument("--method", default="tucker2", help="svd, slice-svd, cp or tucker2")
    p.add_argument("--rank", default="evbmf", help="evbmf, energy:0.9, an integer, or a fraction of the maximum")
    p.add_argument("--layers", nargs="*", default=["*"], help="fnmatch patterns of layer names to factor")
    p.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of layer names to leave dense")
    p.add_argument("--round-to", type=int, default=1, help="round ranks up to a multiple of this")
    p.add_argument("--budget", help="fraction of MACs (0.35) or params (params:0.5) to keep: ranks by sensitivity")
    p.add_argument("--fit-samples", type=int, help="fit factors to this many training images' activations "
                                                   "(default: 256 with --budget, else fit the weights)")
    p.add_argument("--finetune-epochs", type=int, help="epochs of distillation from the dense model")
    p.add_argument("--data", help="CIFAR-10 folder or .npz, for --budget, --fit-samples, --finetune-epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the factored model (.pt) and its plan (.plan.json)")
    p.set_defaults(run=cmd_decompose)

    p = sub.add_parser("bench", help="dense vs budgeted factored models, before/after fine-tuning (bench/report.md)")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.35, 0.25], help="fractions of MACs to keep")
    p.add_argument("--epochs", nargs="+", type=int, default=[3], help="fine-tuning epochs: one count, or one per model")
    p.add_argument("--target", default="rpi4", help="profile whose quantization and decomposition settings apply")
    p.add_argument("--data", help="CIFAR-10 folder or .npz (default: search, see README)")
    p.add_argument("--eval-samples", type=int, default=0, help="class-balanced test subset size (0: full test set)")
    p.add_argument("--latency-rounds", type=int, default=10, help="interleaved rounds of 20 timed runs per model")
    p.add_argument("--out", default="bench")
    p.set_defaults(run=cmd_bench)

    from pipeline.deploy_cli import add_deploy_parser, add_regress_parsers

    add_deploy_parser(sub)
    add_regress_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
