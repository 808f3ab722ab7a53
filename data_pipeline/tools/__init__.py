"""``llama-data`` commands that train and calibrate the models some steps read, and their inputs.

Each command is one module holding the function that does the work and its command-line wrapper:
``add_arguments(parser)`` (argparse) and ``run(args) -> int``; the module docstring's first line is
the command's help. ``text_inputs`` reads the commands' plain input files.
"""

#: ``llama-data <name>`` -> the module of the command (imported when the CLI builds its parser).
COMMANDS: dict[str, str] = {
    "train-lm": "data_pipeline.tools.train_lm",
    "lm-cutoffs": "data_pipeline.tools.lm_cutoffs",
    "train-wiki-classifier": "data_pipeline.tools.train_wiki_classifier",
    "extend-tokenizer": "data_pipeline.tools.extend_tokenizer",
}
