"""The parts library: public building blocks that the built-in plugins use and third-party plugins may import.

``heads`` (projection, prediction, classifier and decoder heads), ``losses`` (the methods' losses, masked MSE,
accuracy), ``ema`` (momentum teachers), ``views`` (view recipes), ``patches`` (patch and tile reshaping) and
``readers`` (dataset file readers and downloads). See docs/plugins.md, section "The parts library".
"""
