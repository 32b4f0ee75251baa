"""prototypes"""
