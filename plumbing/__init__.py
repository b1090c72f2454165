"""What a reader of the paper can skip: each module is named for what it holds, and none imports
anything from the four files that hold the paper (model.py, generate.py, data.py, train.py)."""
