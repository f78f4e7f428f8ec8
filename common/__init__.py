"""What the build (pipeline/) and the trainer (train/) both need, so neither imports the other."""
