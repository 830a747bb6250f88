namespace Distributed.Training;
