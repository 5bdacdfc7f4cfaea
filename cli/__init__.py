"""The top of the house: the project's command line, the embedded demo and the development tools.

`python -m cli COMMAND` runs a Ray job (preprocess, train, train-decoder, evaluate) or a tool (demo, synth, smoke,
make-tiny, broker). Nothing else imports this package.
"""
