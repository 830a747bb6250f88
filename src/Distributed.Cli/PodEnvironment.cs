namespace Distributed.Cli;

/// <summary>
/// The environment a Kubernetes pod gives dtrain (k8s/base sets these from the downward API): the defaults of
/// `dtrain coordinator` and `dtrain worker` where no option says otherwise.
/// </summary>
static class PodEnvironment
{
    /// <summary>The pod's IP (fieldRef status.podIP): the address a node advertises and listens on.</summary>
    public const string PodIp = "POD_IP";

    /// <summary>An Indexed Job's completion index: the rank a worker asks for.</summary>
    public const string CompletionIndex = "JOB_COMPLETION_INDEX";

    public static string AdvertisedHost => Environment.GetEnvironmentVariable(PodIp) is { Length: > 0 } ip ? ip : "127.0.0.1";

    public static int? RankHint => int.TryParse(Environment.GetEnvironmentVariable(CompletionIndex), out int index) && index >= 0 ? index : null;
}
