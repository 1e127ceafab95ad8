"""Package setup, driven by settings.ini (nbdev 2.4 layout)."""
from configparser import ConfigParser
import setuptools, shlex

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
aws_requirements = shlex.split(cfg.get('aws_requirements', ''))

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    license='Apache Software License 2.0',
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_namespace_packages(include=['mlproj', 'mlproj.*']),  # assets/ and jobs/ hold data files only
    include_package_data=True,
    package_data={'mlproj': ['assets/*', 'jobs/*.ipynb']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'aws': aws_requirements},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
