"""An example objective for jobscripts/optuna-worker.sh: copy it and put your training in.

    python example_objective.py --study NAME --trials N [--sleep SECONDS]

Every worker runs this same script; they share the study through the pgjob server of
$PGJOB_HOME, found with pgjob.optuna_storage().
"""
import argparse
import time

import optuna

import pgjob


def objective(trial: optuna.Trial, sleep: float) -> float:
    learning_rate = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
    layers = trial.suggest_int("layers", 1, 4)
    time.sleep(sleep)  # stands in for training a model
    return (learning_rate * 1000 - 3) ** 2 + (layers - 2) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="pgjob-study")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0,
                        help="seconds each trial pretends to train")
    args = parser.parse_args()
    study = optuna.create_study(storage=pgjob.optuna_storage(), study_name=args.study,
                                direction="minimize", load_if_exists=True)
    study.optimize(lambda t: objective(t, args.sleep), n_trials=args.trials)
    print(f"done: {args.trials} trials; best so far {study.best_value:.4g} "
          f"with {study.best_params}")


if __name__ == "__main__":
    main()
