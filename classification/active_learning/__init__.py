"""Active learning: scores, selection strategies, label-tool round trips and the labelling loop."""
