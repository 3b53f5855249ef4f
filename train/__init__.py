"""genrecal.train"""
