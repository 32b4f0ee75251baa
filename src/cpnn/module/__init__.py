"""module"""
