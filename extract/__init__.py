"""genrecal.extract"""
