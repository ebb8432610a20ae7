"""The human side (human stage): THINGS triplet files, concepts and folds (things), VICE and its soft labels p* of
human uncertainty (vice), and SPoSE or a fixed embedding with a fitted temperature (spose)."""
