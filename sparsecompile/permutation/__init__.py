"""Channel permutations for N:M sparsity: graph groups (groups.py) and the search (search.py)."""
