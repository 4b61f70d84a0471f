"""Shampoo: blocked Kronecker preconditioning (see shampoo/README.md)."""
