"""Data tools: a folder of class folders checked, split, resized and counted, and the datasets
training reads."""
